"""Pretraining on a tiny synthetic dataset: outputs, resume after a kill, failure handling."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from pipeline.metrics import COLUMNS, DatasetMetrics
from pipeline.model import build_model
from pipeline.params import load_params
from pipeline.pretrain import pretrain
from pipeline.run import make_run
from tests.helpers import REPO, tiny_params, write_params

CPU = torch.device("cpu")


def cell_run(params_path: Path, dataset: Path, method: str = "simclr", variant: str = "baseline", seed: int = 0):
    params = load_params(params_path)
    meta = DatasetMetrics.model_validate_json((dataset / "meta.json").read_text())
    return make_run(params, "synthetic", method, variant, seed, meta, CPU), params.training


def train(run_and_training, dataset: Path, out: Path):
    run, training = run_and_training
    return pretrain(run, training, dataset / "ffcv", out, CPU, "v")


@pytest.mark.parametrize(
    "method, variant",
    [("simclr", "baseline"), ("simclr", "mi_reg"), ("barlow_twins", "discrete"), ("barlow_twins", "sae")],
)
def test_pretrain_writes_log_checkpoint_and_metrics(tiny_dataset, tmp_path, method, variant):
    run, training = cell_run(tiny_params(tmp_path / "p.yaml"), tiny_dataset, method, variant)
    metrics = pretrain(run, training, tiny_dataset / "ffcv", tmp_path / "run", CPU, "test-version")
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[0] == ",".join(COLUMNS) and len(rows) == 1 + 3
    assert metrics.epochs == 3 and 0 <= metrics.online_test_acc <= 1 and metrics.variant == variant
    assert metrics.lower_bound == pytest.approx(metrics.mi_z1_r_estimate - metrics.mi_z1_z2)
    assert metrics.upper_bound == pytest.approx(metrics.entropy_z1 - metrics.mi_z1_z2)
    assert (metrics.mi_grad_ratio > 0) == (variant == "mi_reg")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3 and state["code_version"] == "test-version"
    assert state["config"]["variant"] == run.variant.__dict__


def stage_command(dataset: Path, params: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stages",
        "pretrain",
        "--params",
        str(params),
        "--dataset",
        "synthetic",
        "--method",
        "simclr",
        "--variant",
        "mi_reg",
        "--seed",
        "3",
        "--data",
        str(dataset / "ffcv"),
        "--metadata",
        str(dataset / "meta.json"),
        "--out",
        str(out),
        "--metrics",
        str(out / "metrics.json"),
    ]


def test_killed_run_resumes_to_identical_metrics(tiny_dataset, tmp_path):
    params = tiny_params(tmp_path / "p.yaml", epochs=4)
    subprocess.run(stage_command(tiny_dataset, params, tmp_path / "whole"), cwd=REPO, check=True, capture_output=True)

    interrupted = subprocess.Popen(
        stage_command(tiny_dataset, params, tmp_path / "killed"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and interrupted.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(interrupted.pid, signal.SIGKILL)  # mid-epoch 2 (or later): no chance to clean up
    interrupted.wait()
    assert torch.load(checkpoint, weights_only=True)["epoch"] < 4, "the kill came too late to test resuming"
    result = subprocess.run(
        stage_command(tiny_dataset, params, tmp_path / "killed"), cwd=REPO, capture_output=True, text=True, check=True
    )
    assert "resuming from" in result.stderr
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert resumed | {"images_per_s": 0} == whole | {"images_per_s": 0}  # throughput aside
    assert (tmp_path / "killed" / "log.csv").read_text().splitlines()[1:][0].split(",")[:-1] == (
        tmp_path / "whole" / "log.csv"
    ).read_text().splitlines()[1:][0].split(",")[:-1]  # throughput aside


def test_checkpoint_of_other_params_is_not_resumed(tiny_dataset, tmp_path):
    train(cell_run(tiny_params(tmp_path / "a.yaml", epochs=1), tiny_dataset), tiny_dataset, tmp_path / "run")
    train(
        cell_run(tiny_params(tmp_path / "b.yaml", epochs=2, base_lr=0.5), tiny_dataset), tiny_dataset, tmp_path / "run"
    )
    assert len((tmp_path / "run" / "log.csv").read_text().splitlines()) == 1 + 2  # started over: 2 fresh epochs


def test_finished_checkpoint_resumed_rewrites_the_log(tiny_dataset, tmp_path):
    """Regression: a requeued or relaunched cell whose checkpoint had every epoch wrote no log.csv, which DVC
    deletes before running the stage, so the stage failed ("output ... log.csv does not exist")."""
    cell = cell_run(tiny_params(tmp_path / "p.yaml", epochs=1), tiny_dataset)
    first = train(cell, tiny_dataset, tmp_path / "run")
    written = (tmp_path / "run" / "log.csv").read_text()
    (tmp_path / "run" / "log.csv").unlink()
    assert train(cell, tiny_dataset, tmp_path / "run") == first
    assert (tmp_path / "run" / "log.csv").read_text() == written


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path):
    train(cell_run(tiny_params(tmp_path / "a.yaml", epochs=1), tiny_dataset), tiny_dataset, tmp_path / "run")
    tiny = tiny_params(tmp_path / "b.yaml", epochs=1)
    overflowing = write_params(
        tmp_path / "b.yaml", tiny, pretrain={"synthetic": {"simclr": {"common": {"temperature": 1e-40}}}}
    )
    with pytest.raises(UserError, match=r"non-finite loss at epoch 1, step 1"):
        train(cell_run(overflowing, tiny_dataset), tiny_dataset, tmp_path / "run2")
    assert not (tmp_path / "run2" / "checkpoint.pt").exists()
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_a_projector_too_large_for_memory_is_a_user_error(tiny_dataset, tmp_path):
    """Issue 14: a huge projector width ended in the allocator's traceback."""
    path = write_params(
        tmp_path / "p.yaml",
        tiny_params(tmp_path / "p.yaml"),
        pretrain={
            "synthetic": {
                "simclr": {
                    "variants": {"sae": {"sae_latent_dim": 1_000_000}},
                    "common": {"projector_hidden_dim": 65_536},
                }
            }
        },
    )
    run, _ = cell_run(path, tiny_dataset, "simclr", "sae")
    limit = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, limit[1]))  # 4 GiB of address space: the SAE needs more
    try:
        with pytest.raises(
            UserError,
            match=r"the projector of pretrain.synthetic.simclr \(variant sae\) does not fit "
            r"in memory .*lower projector_hidden_dim",
        ):
            build_model(run)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, limit)
