"""`bench` end to end on the tiny synthetic dataset: every figure measured and written (values, not speeds,
are checked: a timed unit test proves nothing)."""

import json

import pytest
from typer.testing import CliRunner

from stages.cli import app


@pytest.mark.slow
def test_bench_writes_every_measurement(tiny_dataset, tmp_path):
    out = tmp_path / "bench.json"
    paths = ["--raw", str(tiny_dataset / "raw"), "--data", str(tiny_dataset / "ffcv")]
    paths += ["--metadata", str(tiny_dataset / "meta.json"), "--params", str(tiny_dataset / "params.yaml")]
    sizes = ["--batch-size", "16", "--width", "4", "--batches", "2", "--steps", "1", "--workers", "1"]
    result = CliRunner().invoke(app, ["bench", "--dataset", "synthetic", *paths, *sizes, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "start-up: process start to first training batch" in result.output
    results = json.loads(out.read_text())
    assert all(0 < results["startup"][stage] < 120 for stage in ("pretrain_s", "linear_eval_s"))
    loading = results["loading"]
    assert loading["ours_batches_per_s"] > 0 and loading["reference_batches_per_s"] > 0
    assert results["pretrain_images_per_s"] == pytest.approx(16 / results["step_s"])
    assert 0 < results["regularizer_share"] < 1
    assert results["memory"]["step_peak_bytes_estimate"] > 0 and results["memory"]["step_peak_bytes_measured"] is None
