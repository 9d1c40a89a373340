"""Where a run executes: the device, and the process group when started by torchrun."""

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

_LOADED = time.monotonic()


def init_device() -> torch.device:
    """CUDA when available (the local rank's GPU under torchrun), else CPU; joins torchrun's group."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


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
