"""Pretraining on a tiny synthetic dataset: outputs, resume after a kill, failure handling."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from pipeline.params import load_params
from pipeline.pretrain import COLUMNS, make_run, pretrain
from tests.helpers import REPO, tiny_params, write_params

@pytest.mark.parametrize("method, variant", [("simclr", "baseline"), ("simclr", "mi_reg"),
                                             ("barlow_twins", "discrete"), ("barlow_twins", "sae")])
def test_pretrain_writes_log_checkpoint_and_metrics(tiny_dataset, tmp_path, method, variant):
    params = load_params(tiny_params(tmp_path / "p.yaml"))
    run = make_run(params, "synthetic", method, variant, 0, json.loads((tiny_dataset / "meta.json").read_text()))
    metrics = pretrain(run, tiny_dataset / "ffcv", tmp_path / "run", torch.device("cpu"), "test-version")
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[0] == ",".join(COLUMNS) and len(rows) == 1 + 3
    assert metrics["epochs"] == 3 and 0 <= metrics["online_test_acc"] <= 1
    assert metrics["lower_bound"] == pytest.approx(metrics["mi_z1_r"] - metrics["mi_z1_z2"])
    assert metrics["upper_bound"] == pytest.approx(metrics["entropy_z1"] - metrics["mi_z1_z2"])
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 3 and state["code_version"] == "test-version"
    assert state["config"]["variant"] == params.variants[variant].model_dump()


def stage_command(dataset: Path, params: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "stages", "pretrain", "--params", str(params), "--dataset", "synthetic",
            "--method", "simclr", "--variant", "mi_reg", "--seed", "3", "--data", str(dataset / "ffcv"),
            "--metadata", str(dataset / "meta.json"), "--out", str(out), "--metrics", str(out / "metrics.json")]


def test_killed_run_resumes_to_identical_metrics(tiny_dataset, tmp_path):
    params = tiny_params(tmp_path / "p.yaml", epochs=4)
    subprocess.run(stage_command(tiny_dataset, params, tmp_path / "whole"), cwd=REPO, check=True, capture_output=True)

    interrupted = subprocess.Popen(stage_command(tiny_dataset, params, tmp_path / "killed"), cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and interrupted.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(interrupted.pid, signal.SIGKILL)  # mid-epoch 2 (or later): no chance to clean up
    interrupted.wait()
    assert torch.load(checkpoint, weights_only=False)["epoch"] < 4, "the kill came too late to test resuming"
    result = subprocess.run(stage_command(tiny_dataset, params, tmp_path / "killed"), cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert "resuming from" in result.stderr
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert resumed == whole
    assert (tmp_path / "killed" / "log.csv").read_text().splitlines()[1:][0].split(",")[:-1] == \
        (tmp_path / "whole" / "log.csv").read_text().splitlines()[1:][0].split(",")[:-1]  # throughput aside


def test_checkpoint_of_other_params_is_not_resumed(tiny_dataset, tmp_path):
    meta = json.loads((tiny_dataset / "meta.json").read_text())
    first = make_run(load_params(tiny_params(tmp_path / "a.yaml", epochs=1)), "synthetic", "simclr", "baseline", 0, meta)
    pretrain(first, tiny_dataset / "ffcv", tmp_path / "run", torch.device("cpu"), "v")
    second = make_run(load_params(tiny_params(tmp_path / "b.yaml", epochs=2, base_lr=0.5)), "synthetic", "simclr",
                      "baseline", 0, meta)
    pretrain(second, tiny_dataset / "ffcv", tmp_path / "run", torch.device("cpu"), "v")
    assert len((tmp_path / "run" / "log.csv").read_text().splitlines()) == 1 + 2  # started over: 2 fresh epochs


def test_finished_checkpoint_resumed_rewrites_the_log(tiny_dataset, tmp_path):
    """Regression: a requeued or relaunched cell whose checkpoint had every epoch wrote no log.csv, which DVC
    deletes before running the stage, so the stage failed ("output ... log.csv does not exist")."""
    meta = json.loads((tiny_dataset / "meta.json").read_text())
    run = make_run(load_params(tiny_params(tmp_path / "p.yaml", epochs=1)), "synthetic", "simclr", "baseline", 0, meta)
    first = pretrain(run, tiny_dataset / "ffcv", tmp_path / "run", torch.device("cpu"), "v")
    written = (tmp_path / "run" / "log.csv").read_text()
    (tmp_path / "run" / "log.csv").unlink()
    assert pretrain(run, tiny_dataset / "ffcv", tmp_path / "run", torch.device("cpu"), "v") == first
    assert (tmp_path / "run" / "log.csv").read_text() == written


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path):
    meta = json.loads((tiny_dataset / "meta.json").read_text())
    good = make_run(load_params(tiny_params(tmp_path / "a.yaml", epochs=1)), "synthetic", "simclr", "baseline", 0, meta)
    pretrain(good, tiny_dataset / "ffcv", tmp_path / "run", torch.device("cpu"), "v")
    tiny = tiny_params(tmp_path / "b.yaml", epochs=1)
    overflowing = write_params(tmp_path / "b.yaml", tiny, pretrain={"synthetic": {"simclr": {"temperature": 1e-40}}})
    exploding = make_run(load_params(overflowing), "synthetic", "simclr", "baseline", 0, meta)
    with pytest.raises(UserError, match=r"non-finite loss at epoch 1, step 1"):
        pretrain(exploding, tiny_dataset / "ffcv", tmp_path / "run2", torch.device("cpu"), "v")
    assert not (tmp_path / "run2" / "checkpoint.pt").exists()
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["epoch"] == 1
