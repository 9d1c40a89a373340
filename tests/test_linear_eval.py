"""Linear evaluation: the paper's protocols (finetune, augmented, features), the fast probe, the untrained level."""

import re

import pytest
import torch

from pipeline.fit import train
from pipeline.linear_eval import extract_features, feature_batches, linear_eval, load_backbone
from pipeline.loaders import eval_loader, read_labels
from pipeline.metrics import DatasetMetrics, LinearEvalMetrics
from pipeline.model import build_model
from pipeline.params import load_params
from pipeline.pretrain import pretrain
from pipeline.run import make_run
from tests.helpers import stage_process, tiny_params, write_params

CPU = torch.device("cpu")


def clusters(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, 16, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.arange(5).repeat_interleave(n_per_class)
    return centers[labels] + torch.randn(len(labels), 16, generator=generator), labels


def tiny_run(path, dataset, variant="baseline", seed=0, method="simclr"):
    params = load_params(path)
    meta = DatasetMetrics.model_validate_json((dataset / "meta.json").read_text())
    return make_run(params, "synthetic", method, variant, seed, meta, CPU), params


@pytest.mark.parametrize("optimizer, schedule", [("sgd", "warmup_cosine"), ("sgd", "step"), ("lars", "warmup_cosine")])
def test_probe_learns_separable_features_deterministically(params, tiny_dataset, tmp_path, optimizer, schedule):
    run, _ = tiny_run(tiny_params(tmp_path / "p.yaml"), tiny_dataset)
    fit = params.linear_eval.probe.model_copy(
        update={
            "epochs": 20,
            "batch_size": 32,
            "optimizer": optimizer,
            "schedule": schedule,
            "warmup_epochs": 2,
            "lr_decay_epochs": [12, 16] if schedule == "step" else [],
            "base_lr": 0.8 if optimizer == "sgd" else 16.0,
        }
    )
    features, labels = clusters(40, seed=1)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        probe = train(
            torch.nn.Linear(16, 5),
            *feature_batches(features, labels, fit, run, CPU),
            fit,
            params.optimizer,
            "fp32",
            "test",
        )
        weights.append(probe.weight.detach())
    torch.testing.assert_close(weights[0], weights[1])
    test_features, test_labels = clusters(20, seed=2)
    assert (probe(test_features).argmax(1) == test_labels).float().mean() > 0.95


@pytest.fixture(scope="module")
def pretrained(tiny_dataset, tmp_path_factory):
    """A 1-epoch checkpoint of the tiny SimCLR baseline."""
    tmp = tmp_path_factory.mktemp("pretrained")
    run, params = tiny_run(tiny_params(tmp / "p.yaml", epochs=1), tiny_dataset)
    pretrain(run, params.training, tiny_dataset / "ffcv", tmp / "run", CPU, "v")
    return tmp / "run" / "checkpoint.pt"


@pytest.mark.parametrize("protocol", ["finetune", "augmented", "features"])
def test_only_finetune_changes_the_encoder(tiny_dataset, pretrained, tmp_path, protocol):
    path = write_params(
        tmp_path / "p.yaml",
        tiny_params(tmp_path / "p.yaml", epochs=1),
        linear_eval={"synthetic": {"simclr": {"protocol": protocol}}},
    )
    run, params = tiny_run(path, tiny_dataset)
    backbone = load_backbone(run, pretrained)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = linear_eval(run, backbone, tiny_dataset / "ffcv", params.linear_eval, params.optimizer, CPU)
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v, before[k])]
    if protocol == "finetune":
        assert any(k.endswith("conv1.weight") for k in changed) and any("running_mean" in k for k in changed)
    else:
        assert changed == []
    assert result.protocol == protocol and result.pretrained and (result.n_train, result.n_test) == (80, 40)
    assert 0 <= result.top1 <= result.top5 <= 1 and 0 <= result.knn_top1 <= 1 and 0 <= result.probe_top1 <= 1


def test_a_protocols_crop_scale_replaces_the_views_for_it_alone(tiny_dataset, pretrained, tmp_path):
    """`linear_eval.<dataset>.<method>.crop_scale` trains exactly as `linear_eval.view.crop_scale` set to it (the
    finetune protocol: the encoder's weights after training show the crops it saw)."""

    def finetuned(name, view_scale, protocol_scale):
        path = write_params(
            tmp_path / f"{name}.yaml",
            tiny_params(tmp_path / f"{name}.yaml", epochs=1),
            linear_eval={
                "view": {"crop_scale": view_scale},
                "synthetic": {"simclr": {"protocol": "finetune", "crop_scale": protocol_scale}},
            },
        )
        run, params = tiny_run(path, tiny_dataset)
        backbone = load_backbone(run, pretrained)
        linear_eval(run, backbone, tiny_dataset / "ffcv", params.linear_eval, params.optimizer, CPU)
        return backbone.state_dict()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    overridden = finetuned("overridden", [0.08, 1.0], [0.6, 0.7])
    assert same(overridden, finetuned("view", [0.6, 0.7], None))
    assert not same(overridden, finetuned("default", [0.08, 1.0], None))


def test_untrained_encoder_is_the_pretraining_runs_starting_point(tiny_dataset, tmp_path):
    """`untrained` evaluates the encoder `pretrain` starts from: a 0-step checkpoint of any variant scores the same."""
    path = tiny_params(tmp_path / "p.yaml", epochs=1)
    run, params = tiny_run(path, tiny_dataset, "sae", seed=3)
    torch.manual_seed(run.seed)
    torch.save({"model": build_model(run).state_dict()}, tmp_path / "initial.pt")
    untrained, _ = tiny_run(path, tiny_dataset, "untrained", seed=3)
    results = [
        linear_eval(r, load_backbone(r, checkpoint), tiny_dataset / "ffcv", params.linear_eval, params.optimizer, CPU)
        for r, checkpoint in ((untrained, None), (run, tmp_path / "initial.pt"))
    ]
    assert results[0].model_dump() == results[1].model_dump() | {"variant": "untrained", "pretrained": False}


def test_defaults_are_the_reference_protocols(params):
    """docs/method.md 4.1: what the reference's scripts/linear/*.yaml run."""

    def row(dataset, method):
        s = getattr(getattr(params.linear_eval, dataset), method)
        return (
            s.protocol,
            s.optimizer,
            s.base_lr,
            s.batch_size,
            s.weight_decay,
            s.schedule,
            s.epochs,
            s.lr_decay_epochs,
        )

    for dataset in ("cifar10", "cifar100"):
        assert row(dataset, "simclr") == ("finetune", "lars", 0.4, 256, 1e-4, "warmup_cosine", 200, [])
        assert row(dataset, "barlow_twins") == ("augmented", "lars", 0.3, 256, 1e-4, "warmup_cosine", 50, [])
    assert row("imagenet100", "simclr") == ("finetune", "sgd", 1.0, 512, 0.0, "step", 100, [60, 80])
    assert row("imagenet100", "barlow_twins") == ("finetune", "sgd", 0.1, 256, 0.0, "step", 100, [60, 80])
    assert params.linear_eval.cifar10.simclr.warmup_epochs == 10 and params.optimizer.eta == 0.02
    view = params.linear_eval.view
    assert (view.crop_scale, view.flip_p, view.jitter_p, view.grayscale_p, view.blur_p) == ([0.08, 1.0], 0.5, 0, 0, 0)
    assert params.linear_eval.cifar10.simclr.crop_scale is None  # the view's: only the demo has its own


def test_extracted_labels_are_in_file_order_across_many_batches(tiny_dataset):
    """Regression: FFCV reuses its batch buffers, and the labels kept were views of them: with many batches the
    labels of later batches overwrote earlier ones (the kNN and probes then scored near chance)."""
    path = tiny_dataset / "ffcv" / "train.beton"
    expected = read_labels(path)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4))
    for batch_size in (7, 80):
        _, labels = extract_features(
            backbone, eval_loader(path, batch_size, workers=2), torch.zeros(3), torch.ones(3), "fp32"
        )
        assert labels.tolist() == expected.tolist()


def test_the_stage_shows_progress_and_prints_its_result(tiny_dataset, tmp_path):
    """Issue 14: linear-eval ran for minutes silently and printed no result."""
    cell = ["--dataset", "synthetic", "--method", "simclr", "--variant", "untrained", "--seed", "0"]
    files = ["--data", str(tiny_dataset / "ffcv"), "--metadata", str(tiny_dataset / "meta.json")]
    outputs = ["--metrics", str(tmp_path / "m.json"), "--params", str(tiny_params(tmp_path / "p.yaml"))]
    process = stage_process("linear-eval", *cell, *files, *outputs)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert re.search(r"augmented protocol: 100% \(\d+ steps\)", output), output  # its progress, also in a log
    result = LinearEvalMetrics.model_validate_json((tmp_path / "m.json").read_text())
    assert f"augmented top-1 {result.top1:.4f}, top-5 {result.top5:.4f}; frozen probe top-1" in output
