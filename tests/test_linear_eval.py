import json

import pytest
import torch

from pipeline.linear_eval import feature_batches, fit_probe, linear_eval
from pipeline.params import load_params
from pipeline.pretrain import build_model, make_run, pretrain
from tests.helpers import tiny_params, write_params


def clusters(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, 16, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.arange(5).repeat_interleave(n_per_class)
    return centers[labels] + torch.randn(len(labels), 16, generator=generator), labels


@pytest.mark.parametrize("optimizer, schedule", [("sgd", "cosine"), ("sgd", "step"), ("lars", "cosine")])
def test_probe_learns_separable_features_deterministically(params, optimizer, schedule):
    settings = params.linear_eval.model_copy(update={"epochs": 20, "optimizer": optimizer, "schedule": schedule,
                                                     "lr": 0.1 if optimizer == "sgd" else 2.0})
    features, labels = clusters(40, seed=1)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        probe = fit_probe(torch.nn.Linear(16, 5), *feature_batches(features, labels, 32, seed=3), settings)
        weights.append(probe.weight.detach())
    torch.testing.assert_close(weights[0], weights[1])
    test_features, test_labels = clusters(20, seed=2)
    assert (probe(test_features).argmax(1) == test_labels).float().mean() > 0.95


@pytest.mark.parametrize("protocol", ["features", "augmented"])
def test_linear_eval_of_a_pretrained_checkpoint(tiny_dataset, tmp_path, protocol):
    path = write_params(tmp_path / "p.yaml", tiny_params(tmp_path / "p.yaml", epochs=1),
                        linear_eval={"protocol": protocol, "epochs": 3, "batch_size": 16})
    params = load_params(path)
    run = make_run(params, "synthetic", "simclr", "baseline", 0, json.loads((tiny_dataset / "meta.json").read_text()))
    pretrain(run, tiny_dataset / "ffcv", tmp_path / "run", torch.device("cpu"), "v")
    result = linear_eval(run, tmp_path / "run" / "checkpoint.pt", tiny_dataset / "ffcv", params.linear_eval,
                         torch.device("cpu"))
    assert result["protocol"] == protocol and result["n_train"] == 80 and result["n_test"] == 40
    assert 0 <= result["knn_top1"] <= 1 and 0 <= result["top1"] <= result["top5"] <= 1 and result["pretrained"]


def test_untrained_encoder_is_the_pretraining_runs_starting_point(tiny_dataset, tmp_path):
    """Without a checkpoint the encoder is the one `pretrain` starts from: a 0-step checkpoint scores the same."""
    params = load_params(tiny_params(tmp_path / "p.yaml", epochs=1))
    run = make_run(params, "synthetic", "simclr", "baseline", 3, json.loads((tiny_dataset / "meta.json").read_text()))
    torch.manual_seed(run.seed)
    initial = build_model(run.method, run.cell, run.variant, run.stem, run.num_classes)
    torch.save({"model": initial.state_dict()}, tmp_path / "initial.pt")
    untrained, loaded = (linear_eval(run, checkpoint, tiny_dataset / "ffcv", params.linear_eval, torch.device("cpu"))
                         for checkpoint in (None, tmp_path / "initial.pt"))
    assert untrained == loaded | {"pretrained": False}
