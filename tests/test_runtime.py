"""Where a run executes, through the real stages: loader threads within the CPUs a process may use and without
effect on any number, no silent CPU training when GPUs were asked for, torchrun's process group torn down."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.runtime import DEVICE_VARIABLE
from stages.pretrain import NPROC_VARIABLE
from tests.helpers import REPO, pretrain_args, stage_process, tiny_sections, write_params

FIRST_CPU = min(os.sched_getaffinity(0))


def params_with(path: Path, **training) -> Path:
    sections = tiny_sections()
    return write_params(path, **sections | {"training": sections["training"] | training})


def cell_outputs(out: Path) -> dict:
    """Everything a cell computed (pretraining's weights, log and metrics, linear-eval's metrics), less speed."""
    with open(out / "log.csv") as f:
        log = [{k: v for k, v in row.items() if k != "images_per_s"} for row in csv.DictReader(f)]
    metrics = {
        name: {k: v for k, v in json.loads((out / name).read_text()).items() if k != "images_per_s"}
        for name in ("metrics.json", "linear.json")
    }
    return {"model": torch.load(out / "checkpoint.pt", weights_only=True)["model"], "log": log, **metrics}


def start_cell(params: Path, dataset: Path, out: Path, cpus: set[int] | None = None) -> subprocess.Popen:
    """`pretrain` then `linear-eval` of the tiny Barlow Twins cell, in one shell, on `cpus` (default: all)."""
    stages = [sys.executable, "-m", "stages"]
    evaluate = ["linear-eval", "--params", str(params), "--dataset", "synthetic", "--method", "barlow_twins"]
    evaluate += ["--variant", "baseline", "--seed", "0", "--data", str(dataset / "ffcv")]
    evaluate += ["--metadata", str(dataset / "meta.json"), "--checkpoint", str(out / "checkpoint.pt")]
    evaluate += ["--metrics", str(out / "linear.json")]
    pinned = ["taskset", "--cpu-list", ",".join(map(str, sorted(cpus)))] if cpus else []
    script = " && ".join(
        subprocess.list2cmdline(pinned + stages + args) for args in (pretrain_args(params, dataset, out), evaluate)
    )
    return subprocess.Popen(["sh", "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(cell: subprocess.Popen) -> None:
    output, _ = cell.communicate()
    assert cell.returncode == 0, output[-3000:]


@pytest.mark.slow
def test_loader_threads_and_a_cell_beside_another_change_no_number(tiny_dataset, tmp_path):
    """Issues 17.4 and 18.1: FFCV set torch's intra-op threads to `loader_workers`, and oneDNN's reductions round by
    thread, so loader_workers 1 and -1 gave other losses; -1 meant every CPU of the machine, which numba refuses
    under a narrower affinity (taskset, cpusets, Slurm, `launch` pinning a cell beside another): a ValueError.
    Bit-identical, not within a tolerance: the same machine runs the same kernels, so any difference is a bug."""
    alone = start_cell(params_with(tmp_path / "one.yaml", loader_workers=1), tiny_dataset, tmp_path / "one")
    finish(alone)
    side_by_side = [
        start_cell(
            params_with(tmp_path / "share.yaml", loader_workers=-1), tiny_dataset, tmp_path / "share", {FIRST_CPU}
        ),
        start_cell(params_with(tmp_path / "two.yaml", loader_workers=2), tiny_dataset, tmp_path / "two"),
    ]
    for cell in side_by_side:
        finish(cell)
    reference = cell_outputs(tmp_path / "one")
    for name in ("share", "two"):
        outputs = cell_outputs(tmp_path / name)
        assert outputs["log"] == reference["log"] and outputs["metrics.json"] == reference["metrics.json"], name
        assert outputs["linear.json"] == reference["linear.json"], name
        assert all(torch.equal(outputs["model"][k], v) for k, v in reference["model"].items()), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA cannot be used")
@pytest.mark.parametrize(
    "environment, message",
    [
        ({"CUDA_VISIBLE_DEVICES": "0"}, "error: CUDA_VISIBLE_DEVICES=0 asks for GPUs, but CUDA cannot be used ("),
        ({NPROC_VARIABLE: "2"}, "error: 2 processes per cell ask for GPUs, but CUDA cannot be used ("),
    ],
)
def test_a_cell_that_asks_for_gpus_stops_when_cuda_cannot_be_used(tiny_dataset, tmp_path, environment, message):
    """Issues 18.2 and 20.4: the cell trained on the CPU and exited 0 (on a GPU node whose driver is too old for the
    wheels, while `launch` showed it on a GPU). PROJECTOR_IB_DEVICE=cpu is the way to mean it (other tests)."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != DEVICE_VARIABLE} | environment
    result = stage_process(*pretrain_args(params_with(tmp_path / "p.yaml"), tiny_dataset, out), env=env)
    output, _ = result.communicate()
    assert result.returncode == 1 and output.startswith(message) and len(output.splitlines()) == 1, output[-3000:]
    assert f"{DEVICE_VARIABLE}=cpu to train on the CPU on purpose" in output
    if torch.version.cuda:  # CUDA wheels: the driver they need, and the one found
        assert "which needs an NVIDIA driver >= " in output and "; driver found: " in output
    assert not out.exists()


RANK = """import atexit, runpy, sys
import torch.distributed as dist
atexit.register(lambda: print("process group at exit:", "left" if dist.is_initialized() else "destroyed", flush=True))
sys.argv[0] = "stages"
runpy.run_module("stages", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("batch_size, exit_code", [(16, 0), (15, 1)])  # 15: an error inside the group
def test_torchrun_processes_destroy_their_process_group(tiny_dataset, tmp_path, batch_size, exit_code):
    """Issue 18.7: the group was never destroyed (on NCCL: warnings at exit, possible hangs). Two gloo ranks on
    the CPU; the GPU half (the device set before joining, `device_id`) is for scripts/gpu-check to confirm."""
    (tmp_path / "rank.py").write_text(RANK)
    params = write_params(tmp_path / "p.yaml", **tiny_sections(epochs=1, batch_size=batch_size))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr=127.0.0.1"]
    command = [*torchrun, "--nproc-per-node=2", str(tmp_path / "rank.py")]
    command += pretrain_args(params, tiny_dataset, tmp_path / "run")
    env = {**os.environ, DEVICE_VARIABLE: "cpu"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert (result.returncode != 0) == bool(exit_code), result.stderr[-3000:]
    exits = re.findall(r"process group at exit: (\w+)", result.stdout)
    assert exits and set(exits) == {"destroyed"}, result.stdout
    assert len(exits) == 2 or exit_code, result.stdout  # after an error, torchrun may stop the other rank first
    assert "destroy_process_group" not in result.stderr
