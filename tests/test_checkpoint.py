"""Checkpoints through the CLI (issue 14): a crafted pickle cannot run code, and a damaged checkpoint is named
with what to do about it, in one line, exit 1, no metrics written."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stages.cli import app
from tests.helpers import tiny_params


class Payload:
    """Unpickled without weights_only, this creates `marker`: a stand-in for any code a crafted file runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def crafted(path: Path, marker: Path) -> Path:
    torch.save({"model": {}, "epoch": Payload(marker)}, path)
    return path


def test_the_crafted_checkpoint_runs_code_when_unpickled_unsafely(tmp_path):
    """The payload is real: without weights_only, loading it creates the marker."""
    marker = tmp_path / "ran"
    torch.load(crafted(tmp_path / "c.pt", marker), weights_only=False)
    assert marker.exists()


def stage(command: str, dataset: Path, tmp_path: Path, *args: str):
    cell = ["--dataset", "synthetic", "--method", "simclr", "--seed", "0", "--data", str(dataset / "ffcv")]
    files = ["--metadata", str(dataset / "meta.json"), "--metrics", str(tmp_path / "m.json")]
    params = ["--params", str(tiny_params(tmp_path / "p.yaml"))]
    return CliRunner().invoke(app, [command, *cell, *files, *params, *args])


def check_refused(result, path: Path, message: str, tmp_path: Path) -> None:
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: {path}: ") and message in result.output, result.output
    assert len(result.output.splitlines()) == 1 and not (tmp_path / "m.json").exists()


def test_linear_eval_refuses_a_crafted_checkpoint_without_running_it(tiny_dataset, tmp_path):
    marker = tmp_path / "ran"
    checkpoint = crafted(tmp_path / "checkpoint.pt", marker)
    result = stage("linear-eval", tiny_dataset, tmp_path, "--variant", "baseline", "--checkpoint", str(checkpoint))
    check_refused(result, checkpoint, "not a readable checkpoint (it holds objects other than tensors", tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("crafted", "not a readable checkpoint (it holds objects other than tensors, and loading them could run code)"),
        ("truncated", "not a readable checkpoint (PytorchStreamReader failed reading zip archive: "),
        ("zero bytes", "not a readable checkpoint (an empty file)"),
        ("no weights", "not a checkpoint of this pipeline (no model weights)"),
    ],
)
def test_pretrain_names_a_bad_checkpoint_in_its_run_folder(tiny_dataset, tmp_path, damage, message):
    run, marker = tmp_path / "run", tmp_path / "ran"
    run.mkdir()
    checkpoint = run / "checkpoint.pt"
    if damage == "crafted":
        crafted(checkpoint, marker)
    elif damage == "truncated":
        torch.save({"model": {"w": torch.zeros(1000)}}, checkpoint)
        checkpoint.write_bytes(checkpoint.read_bytes()[:500])
    elif damage == "zero bytes":
        checkpoint.write_bytes(b"")
    else:
        torch.save({"epoch": 3}, checkpoint)
    result = stage("pretrain", tiny_dataset, tmp_path, "--variant", "baseline", "--out", str(run))
    check_refused(result, checkpoint, message, tmp_path)
    assert result.output.rstrip().endswith("; remove it to start this run over")
    assert not marker.exists()
