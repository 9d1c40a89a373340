"""Reading a converted dataset back: bad .beton files and metadata are refused before training, naming the file.

Issue 14: each case below was a traceback (ValueError, AssertionError, IndexError, FileNotFoundError,
JSONDecodeError, KeyError) from deep inside FFCV or the training loop.
"""

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from pipeline.errors import UserError
from pipeline.loaders import check_betons
from stages.cli import app
from tests.helpers import tiny_params


def corrupt(data, meta):
    """Cases: (what to do to the copy of a converted dataset, the file named, what the message says)."""
    train, test = data / "train.beton", data / "test.beton"
    return {
        "truncated": (
            lambda: train.write_bytes(train.read_bytes()[: train.stat().st_size // 2]),
            train,
            "truncated or corrupt",
        ),
        "random bytes": (lambda: train.write_bytes(os.urandom(50_000)), train, "not an FFCV .beton file"),
        "zero bytes": (lambda: test.write_bytes(b""), test, "0 bytes is too short for a .beton file"),
        "no test.beton": (test.unlink, test, "no such file"),
        "labels beyond num_classes": (
            lambda: meta.write_text(
                json.dumps(json.loads(meta.read_text()) | {"classes": ["a", "b"], "num_classes": 2})
            ),
            train,
            f"labels range over 0..9, but {meta} has num_classes 2",
        ),
        "metadata missing": (meta.unlink, meta, "no such file; run convert again"),
        "metadata truncated": (lambda: meta.write_text(meta.read_text()[:100]), meta, "not valid JSON"),
        "metadata without num_classes": (
            lambda: meta.write_text(
                json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "num_classes"})
            ),
            meta,
            "not a valid DatasetMetrics file: num_classes: Field required",
        ),
    }


@pytest.fixture
def dataset_copy(tiny_dataset, tmp_path):
    shutil.copytree(tiny_dataset / "ffcv", tmp_path / "ffcv")
    shutil.copy(tiny_dataset / "meta.json", tmp_path / "meta.json")
    return tmp_path / "ffcv", tmp_path / "meta.json"


CELL = ["--dataset", "synthetic", "--method", "simclr", "--seed", "0"]


@pytest.mark.parametrize(
    "case",
    [
        "truncated",
        "random bytes",
        "zero bytes",
        "no test.beton",
        "labels beyond num_classes",
        "metadata missing",
        "metadata truncated",
        "metadata without num_classes",
    ],
)
@pytest.mark.parametrize("command", ["pretrain", "linear-eval"])
def test_bad_dataset_files_are_refused_before_training(dataset_copy, tmp_path, case, command):
    data, meta = dataset_copy
    damage, named, message = corrupt(data, meta)[case]
    damage()
    outputs = {
        "pretrain": ["--variant", "baseline", "--out", str(tmp_path / "run"), "--metrics", str(tmp_path / "m.json")],
        "linear-eval": ["--variant", "untrained", "--metrics", str(tmp_path / "m.json")],
    }[command]
    result = CliRunner().invoke(
        app,
        [
            command,
            *CELL,
            "--data",
            str(data),
            "--metadata",
            str(meta),
            *outputs,
            "--params",
            str(tiny_params(tmp_path / "p.yaml")),
        ],
    )
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: {named}: ") and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "run").exists()


def test_check_betons_accepts_a_converted_dataset(tiny_dataset):
    check_betons(tiny_dataset / "ffcv", 10)
    with pytest.raises(UserError, match=r"labels range over 0\.\.9, but the metadata has num_classes 9"):
        check_betons(tiny_dataset / "ffcv", 9)
