"""Where a run executes: its device, its CPU threads, and the process group when started by torchrun."""

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.errors import UserError

_LOADED = time.monotonic()
# `cpu`: train on the CPU on purpose, whatever CUDA_VISIBLE_DEVICES says, also with several processes (gloo).
# Unset, a run that asks for GPUs (CUDA_VISIBLE_DEVICES names some, or several processes) and cannot use CUDA stops.
DEVICE_VARIABLE = "PROJECTOR_IB_DEVICE"
# The oldest Linux x86-64 driver each CUDA major version runs on (NVIDIA's CUDA compatibility table).
DRIVER_MINIMUM = {"12": "525.60.13", "13": "580.65.06"}


@contextmanager
def on_device(torch_threads: int) -> Iterator[torch.device]:
    """This process's device (`choose_device`) with torch's CPU threads set to `torch_threads`; under torchrun,
    the process group around the block: the GPU set first, the group joined with it, destroyed on the way out."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = choose_device(world)
    torch.set_num_threads(torch_threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group: each rank's CUDA context and communicator on its own GPU
    if world > 1:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        yield device
    finally:
        if world > 1:
            dist.destroy_process_group()


def choose_device(processes: int = 1) -> torch.device:
    """The CPU with PROJECTOR_IB_DEVICE=cpu; else CUDA when available (the local rank's GPU under torchrun); else
    the CPU, unless the run asks for GPUs (CUDA_VISIBLE_DEVICES names some, or `processes` > 1): then a UserError
    says why CUDA cannot be used, instead of training on the CPU unseen."""
    forced = os.environ.get(DEVICE_VARIABLE, "")
    if forced not in ("", "cpu"):
        raise UserError(f"{DEVICE_VARIABLE}={forced!r}: expected cpu (train on the CPU on purpose), or leave it unset")
    if forced == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible not in ("", "-1"):
        raise UserError(f"CUDA_VISIBLE_DEVICES={visible} asks for GPUs, but {cuda_failure()}")
    if processes > 1:
        raise UserError(f"{processes} processes per cell ask for GPUs, but {cuda_failure()}")
    return torch.device("cpu")


def cuda_failure() -> str:
    """Why this PyTorch cannot use CUDA here, with the driver it needs and the one found, and what to do."""
    if torch.version.cuda is None:
        return f"PyTorch {torch.__version__} is built without CUDA; to train on the CPU, set {DEVICE_VARIABLE}=cpu"
    try:
        torch.cuda.init()
        reason = "CUDA sees no GPU"
    except RuntimeError as e:
        reason = str(e).split(". ")[0].rstrip(".")
    cuda = torch.version.cuda
    needed = DRIVER_MINIMUM.get(cuda.split(".")[0], "of its CUDA version")
    return (
        f"CUDA cannot be used ({reason}): PyTorch {torch.__version__} is built for CUDA {cuda}, which needs an "
        f"NVIDIA driver >= {needed}; driver found: {_driver_version()}. Name GPUs that exist, update the driver, "
        f"or set {DEVICE_VARIABLE}=cpu to train on the CPU on purpose"
    )


def _driver_version() -> str:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return "none (no NVIDIA kernel module loaded)"
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", text)
    return found[1] if found else text.splitlines()[0]


def cpu_share() -> int:
    """The CPUs this process may use (its affinity: taskset, a cgroup cpuset, Slurm's, `launch`'s pinning), divided
    among the processes torchrun started on this node; at least 1."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def seconds_since_start() -> float:
    """Wall seconds since this process started (Linux: from /proc; elsewhere: since this module loaded)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return time.monotonic() - _LOADED


def autocast(precision: str, device_type: str) -> torch.autocast:
    """bf16 autocast (the same code path on CPU and CUDA), or a disabled one for fp32."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def prepare_convolutions(channels_last: bool, device: torch.device) -> torch.memory_format:
    """The memory format of the model and its images. On CUDA: channels_last when asked (tensor-core convolutions
    run in NHWC), and cuDNN times its algorithms for each new shape and keeps the fastest (`cudnn.benchmark`:
    shapes are fixed here; GPU runs are not bit-reproducible anyway, docs/gpu.md). A CPU stays contiguous:
    oneDNN's channels_last backward is less accurate (README, GPU)."""
    if device.type != "cuda":
        return torch.contiguous_format
    torch.backends.cudnn.benchmark = True
    return torch.channels_last if channels_last else torch.contiguous_format
