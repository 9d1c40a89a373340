import json

import torch

from pipeline.linear_eval import evaluate_features, linear_eval, train_probe
from pipeline.params import load_params
from pipeline.pretrain import make_run, pretrain
from tests.conftest import tiny_params


def clusters(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, 16, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.arange(5).repeat_interleave(n_per_class)
    return centers[labels] + torch.randn(len(labels), 16, generator=generator), labels


def test_probe_learns_separable_features_deterministically():
    features, labels = clusters(40, seed=1)
    first = train_probe(features, labels, 5, epochs=20, batch_size=32, lr=0.1, momentum=0.9, weight_decay=0.0, seed=3)
    again = train_probe(features, labels, 5, epochs=20, batch_size=32, lr=0.1, momentum=0.9, weight_decay=0.0, seed=3)
    torch.testing.assert_close(first.weight, again.weight)
    result = evaluate_features(clusters(40, 1), clusters(20, 2), 5, epochs=20, batch_size=32, lr=0.1, momentum=0.9,
                               weight_decay=0.0, knn_k=10, knn_temperature=0.1, seed=0)
    assert result["top1"] > 0.95 and result["knn_top1"] > 0.95 and result["top5"] == 1.0
    assert (result["n_train"], result["n_test"]) == (200, 100)


def test_linear_eval_of_a_pretrained_checkpoint(tiny_dataset, tmp_path):
    params = load_params(tiny_params(tmp_path / "p.yaml", epochs=1))
    run = make_run(params, "synthetic", "simclr", "baseline", 0, json.loads((tiny_dataset / "meta.json").read_text()))
    pretrain(run, tiny_dataset / "ffcv", tmp_path / "run", torch.device("cpu"), "v")
    result = linear_eval(run, tmp_path / "run" / "checkpoint.pt", tiny_dataset / "ffcv", params.linear_eval,
                         torch.device("cpu"))
    assert result["protocol"] == "features" and result["n_train"] == 80 and result["n_test"] == 40
    assert 0 <= result["knn_top1"] <= 1 and 0 <= result["top1"] <= result["top5"] <= 1
