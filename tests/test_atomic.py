"""Outputs that cannot be written (a full disk): each stage stops with one line naming the file, leaves no staging
name and keeps the previous output. The file size limit (RLIMIT_FSIZE, with SIGXFSZ ignored as a shell's
`ulimit -f` leaves it) stands in for a full disk: a write past it fails with EFBIG as a write to a full disk
fails with ENOSPC, and both take the same path through the code."""

import resource
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.atomic import atomic_dir, atomic_file
from pipeline.beton import SHM, SHM_PREFIX
from pipeline.errors import UserError
from pipeline.report import write_report
from stages.report import run_logs
from tests.helpers import REPO, TABLE_ONLY, pretrain_args, stage_process, tiny_params, write_params
from tests.test_pretrain import cell_run, train
from tests.test_report import EXPERIMENT, write_cells

TOO_LARGE = "failed: file too large; raise the file size limit (ulimit -f) and run again"


def file_size_limit(limit: int):
    """A preexec_fn: files of this process may not grow beyond `limit` bytes."""

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limited


def run_limited(limit: int, *args: str) -> tuple[subprocess.Popen, str]:
    """`python -m stages ARGS` under the file size limit; its process and output once it exits."""
    process = stage_process(*args, preexec_fn=file_size_limit(limit))
    try:
        output = process.communicate(timeout=240)[0]  # imports take seconds on a loaded machine; a hang, forever
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process, output


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(process: subprocess.Popen, output: str, message: str) -> None:
    assert process.returncode == 1 and "Traceback" not in output, output
    assert output.splitlines()[-1] == f"error: {message}", output


def test_atomic_file_names_the_output_and_keeps_the_previous_one(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("previous")
    with pytest.raises(UserError, match=rf"^writing {out} failed: no space left on device; free space .*as it was"):
        with atomic_file(out) as staging:
            staging.write_text("partial")
            raise OSError(28, "No space left on device")
    assert out.read_text() == "previous" and sorted(tmp_path.iterdir()) == [out]


def test_atomic_dir_names_the_file_in_the_staging_folder_as_it_will_be(tmp_path):
    out = tmp_path / "betons"
    with pytest.raises(UserError, match=rf"^writing {out / 'train.beton'} failed: .*\(nothing written\)"):
        with atomic_dir(out) as staging:
            raise OSError(27, "File too large", str(staging / "train.beton"))
    assert list(tmp_path.iterdir()) == []


def test_convert_that_cannot_write_fails_at_once_and_keeps_the_previous_betons(tiny_dataset, tmp_path):
    """Issue 20: under a 1 MB limit, `convert` named the write error, or, when the failing write was a worker's
    last page, waited forever for that worker's allocation table, leaving .ffcv.partial/ behind."""
    out, metadata = tmp_path / "ffcv", tmp_path / "meta.json"
    out.mkdir()
    for path in (out / "train.beton", out / "test.beton", metadata):
        path.write_text("the previous conversion")
    before = snapshot(tmp_path)
    params = str(tiny_params(tmp_path / "p.yaml"))
    paths = ["--raw", str(tiny_dataset / "raw"), "--out", str(out), "--metadata", str(metadata)]
    process, output = run_limited(1 << 20, "convert", "--dataset", "synthetic", "--params", params, *paths)
    assert_refused(process, output, f"writing {out / 'train.beton'} {TOO_LARGE} ({out} is as it was)")
    assert snapshot(tmp_path) == before | {tmp_path / "p.yaml": (tmp_path / "p.yaml").read_bytes()}
    assert not list(SHM.glob(f"{SHM_PREFIX}{process.pid}_*"))


def test_pretrain_that_cannot_write_its_checkpoint_keeps_the_last_one(tiny_dataset, tmp_path):
    """Issue 20: a checkpoint over the limit ended in torch's "RuntimeError: [enforce fail at
    inline_container.cc:672] ... unexpected pos", which named neither the file nor the cause."""
    run = tmp_path / "run"
    train(cell_run(tiny_params(tmp_path / "a.yaml", epochs=1), tiny_dataset), tiny_dataset, run)  # also warms numba
    checkpoint = (run / "checkpoint.pt").read_bytes()
    assert len(checkpoint) > 1 << 16
    params = tiny_params(tmp_path / "b.yaml", epochs=2)  # other params: the run starts over, and saves epoch 1
    process, output = run_limited(1 << 16, *pretrain_args(params, tiny_dataset, run))
    checkpoint_path = run / "checkpoint.pt"
    assert_refused(process, output, f"writing {checkpoint_path} {TOO_LARGE} ({checkpoint_path} is as it was)")
    assert checkpoint_path.read_bytes() == checkpoint and sorted(p.name for p in run.iterdir()) == [
        "checkpoint.pt",
        "log.csv",
    ]


def test_linear_eval_that_cannot_write_its_metrics_keeps_the_previous_ones(tiny_dataset, tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text("previous")
    params = write_params(  # features: no augmentation kernel to compile (and cache) under the limit
        tmp_path / "p.yaml",
        tiny_params(tmp_path / "p.yaml"),
        linear_eval={"synthetic": {"simclr": {"protocol": "features"}}},
    )
    cell = ["--dataset", "synthetic", "--method", "simclr", "--variant", "untrained", "--seed", "0"]
    files = ["--data", str(tiny_dataset / "ffcv"), "--metadata", str(tiny_dataset / "meta.json")]
    process, output = run_limited(64, "linear-eval", *cell, *files, "--metrics", str(metrics), "--params", str(params))
    assert_refused(process, output, f"writing {metrics} {TOO_LARGE} ({metrics} is as it was)")
    assert sorted(tmp_path.iterdir()) == [metrics, params] and metrics.read_text() == "previous"


def test_report_that_cannot_write_keeps_the_previous_report(tmp_path):
    write_cells(tmp_path)
    reports, reference = tmp_path / "reports", REPO / "references" / "paper.yaml"
    folders = [tmp_path / name for name in ("pretrain", "linear_eval", "untrained", "provenance")]
    write_report(EXPERIMENT, [], *folders, run_logs(tmp_path / "runs"), reference, reports)  # the previous report
    before = snapshot(tmp_path)
    params = write_params(tmp_path / "p.yaml", experiment=EXPERIMENT.model_dump(), figures=TABLE_ONLY)
    options = ["--pretrain-metrics", "--linear-metrics", "--untrained-metrics", "--provenance"]
    paths = [arg for option, folder in zip(options, folders) for arg in (option, str(folder))]
    process, output = run_limited(
        512,
        *("report", *paths, "--runs", str(tmp_path / "runs"), "--reference", str(reference)),
        *("--out", str(reports), "--summary", str(tmp_path / "report.json"), "--params", str(params)),
    )
    assert_refused(process, output, f"writing {reports} {TOO_LARGE} ({reports} is as it was)")
    assert snapshot(tmp_path) == before | {params: params.read_bytes()}
    assert not (tmp_path / ".reports.partial").exists()


def test_a_checkpoint_saved_through_the_error_recording_writer_loads_as_saved(tmp_path):
    from pipeline.checkpoint import load_checkpoint, save_checkpoint

    state = {"model": {"w": torch.arange(10.0)}, "epoch": 3}
    save_checkpoint(state, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt", "")
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], state["model"]["w"])
