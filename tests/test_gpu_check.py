"""scripts/gpu-check: its CPU mode (what CI runs) and, where there is a GPU, its full run."""

import json
import runpy
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import REPO

SECTIONS = {
    "throughput",
    "augmentation",
    "memory",
    "sync",
    "precision",
    "gradients",
    "distributed",
    "lars",
    "losses",
    "finetune",
    "loader",
    "packing",
    "compile",
    "done",
}
GPU_ONLY = {"sync", "distributed", "loader", "packing", "compile"}
NOT_NEEDED = ("ffcv", "torchvision", "typer", "dvc", "matplotlib")  # project packages the script must not need


def gpu_check(tmp_path, *args: str, timeout: float) -> tuple[dict, dict]:
    """Run the script with the packages of NOT_NEEDED made unimportable; (the JSON printed, the JSON written)."""
    block = (
        f"import sys, runpy; sys.modules.update(dict.fromkeys({NOT_NEEDED!r})); "
        f"sys.argv = ['gpu-check', *{[*args, str(tmp_path / 'report.json')]!r}]; "
        "runpy.run_path('scripts/gpu-check', run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", block], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout), json.loads((tmp_path / "report.json").read_text())


def test_cpu_mode_reports_every_section_in_under_2_minutes(tmp_path):
    printed, report = gpu_check(tmp_path, "--cpu", timeout=120)
    assert printed == report
    assert report["mode"] == "cpu" and report["environment"]["ffcv"] is False
    sections = report["sections"]
    assert set(sections) == SECTIONS
    assert all(sections[name] == {"skipped": "GPU-only: skipped with --cpu"} for name in GPU_ONLY)
    assert all("error" not in sections[name] and "skipped" not in sections[name] for name in SECTIONS - GPU_ONLY)
    for precision in ("fp32", "bf16"):
        assert sections["throughput"][f"{precision}_contiguous"]["images_per_s"] > 0
    for size in (32, 224):
        assert sections["augmentation"][f"{size}px"]["size_px"] == size
        assert sections["augmentation"][f"{size}px"]["images_per_s"] > 0
    lars = sections["lars"]
    assert lars["ops"] < lars["parameter_tensors"] < lars["ops_nested"]  # fused: fewer launches than tensors
    for method, out_dim in (("simclr", 256), ("barlow_twins", 2048)):  # params.yaml's CIFAR projections
        cost = sections["losses"][f"cifar10-{method}"]
        assert cost["shape"] == [2, 8, out_dim] and cost["bf16_ms"] > 0 and cost["fp32_ms"] > 0
    finetune = sections["finetune"]["cifar10-simclr"]
    assert finetune["images_per_s"] > 0 and finetune["optimizer"] == "lars" and finetune["batch_size"] == 8
    assert sections["memory"]["cifar10-simclr-baseline"]["estimate_bytes"] > 0
    assert sections["precision"]["finite"]
    assert sections["precision"]["ssl_loss"]["relative_diff_first"] < 0.01  # bf16's rounding, before any drift
    assert 0 < sections["gradients"]["relative_error_vs_float64"]["contiguous"] < 0.01
    assert sections["done"] == {"ok": True}


def test_a_section_reports_its_result_or_why_it_has_none(tmp_path):
    script = runpy.run_path(str(REPO / "scripts" / "gpu-check"), run_name="gpu_check")
    check = script["Check"].__new__(script["Check"])  # only the section runner: no params, no device
    check.report, check.report_path, check.deadline = {"sections": {}}, tmp_path / "r.json", time.monotonic() + 60

    def fails(seconds):
        raise ValueError("no such kernel")

    check.section("quick", 10, None, lambda seconds: {"allowed": seconds})
    check.section("slow", 2.5, None, lambda seconds: time.sleep(30))
    check.section("failing", 10, None, fails)
    check.section("gpu", 10, "GPU-only", lambda seconds: {})
    check.deadline = time.monotonic() + 1
    check.section("late", 10, None, lambda seconds: {})
    sections = json.loads((tmp_path / "r.json").read_text())["sections"]
    assert sections["quick"]["allowed"] == pytest.approx(10)
    assert sections["slow"]["skipped"] == "overran its 2 s budget" and sections["slow"]["seconds"] < 5
    assert sections["failing"]["error"] == "ValueError: no such kernel"
    assert sections["gpu"] == {"skipped": "GPU-only"}
    assert sections["late"]["skipped"].startswith("no time left")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mode_runs_every_section(tmp_path):
    _, report = gpu_check(tmp_path, timeout=330)
    errors = {name: result for name, result in report["sections"].items() if "error" in result}
    assert not errors
