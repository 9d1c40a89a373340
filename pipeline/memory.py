"""How much GPU memory a cell's training needs, estimated without a GPU, and how many cells to pack on one GPU.

`step_peak_bytes` runs the cell's own model (pipeline.model), training step (pipeline.step) and LARS on fake
tensors (FakeTensorMode: shapes and dtypes, no storage) and takes the peak of the live storages that torch's
MemTracker counts. `cells_per_gpu` turns it into K, the number of cells run side by side on one GPU.
"""

import dataclasses
import math
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from pipeline.model import build_model, make_optimizer
from pipeline.run import Run
from pipeline.step import backward, forward, gradient_ratio

# What the estimate leaves out, per cell (one process): the allocator's rounding, caching and fragmentation
# and the convolutions' workspaces, as a factor on the estimate; the CUDA context and the cuBLAS/cuDNN
# handles, as bytes. Both are guesses until scripts/gpu-check measures them (max_memory_allocated / estimate).
SAFETY = 1.25
CONTEXT_BYTES = 1 << 30
RESERVE_BYTES = 2 << 30  # per GPU: left free for the driver and for other users of the GPU


def step_peak_bytes(run: Run, batch_size: int, precision: str) -> int:
    """Peak bytes of the tensors live while `run` trains on batches of `batch_size` images (one process's
    batch) under `precision` ("bf16" or "fp32"): parameters, gradients, LARS momentum, the two augmented
    views, activations and temporaries.

    Two steps as an epoch's first step runs them (with the gradient ratio's extra backward), so the second
    holds the momentum the first made. Modelled with the CPU's autocast (CUDA's cannot run without a GPU;
    both cast convolutions and matrix products to bf16 and keep batch norm in its input's dtype). Not
    counted: the augmentation's transient buffers (freed before the forward pass, and smaller than its peak),
    and what SAFETY and CONTEXT_BYTES stand for.
    """
    with FakeTensorMode(), MemTracker() as tracker:
        # MemTracker refuses a module called again in a new iteration unless its statistics are reset
        training_steps(dataclasses.replace(run, precision=precision), batch_size, 2, tracker.reset_mod_stats)
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def training_steps(run: Run, batch_size: int, steps: int, after_step: Callable[[], None] = lambda: None) -> None:
    """`steps` training steps of a new model of `run` on random inputs, each as an epoch's first step runs it."""
    model = build_model(run)
    optimizer = make_optimizer(model, run)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"]
    parameters = list(model.parameters())
    for _ in range(steps):
        x = torch.randn(2, batch_size, 3, run.crop_size, run.crop_size)  # (2, N, 3, S, S): both views
        out = forward(model, run, x[0], x[1], torch.randint(0, run.num_classes, (batch_size,)))
        gradient_ratio(out, run)
        optimizer.zero_grad(set_to_none=True)
        backward(out, run, parameters)
        optimizer.step()
        del x, out
        after_step()


def cells_per_gpu(step_bytes: int, gpu_bytes: int, saturation: int | None = None) -> int:
    """K, the cells to run side by side on a GPU of `gpu_bytes`: as many as fit,

        K_memory = floor((gpu_bytes − RESERVE_BYTES) / (SAFETY · step_bytes + CONTEXT_BYTES)),

    and no more than `saturation`, the K past which more cells no longer raise the GPU's total images/s
    (`saturating_cells` of a measurement; None: memory alone). 0 when one cell does not fit.
    """
    fit = math.floor((gpu_bytes - RESERVE_BYTES) / (SAFETY * step_bytes + CONTEXT_BYTES))
    return max(0, fit if saturation is None else min(fit, saturation))


def saturating_cells(images_per_s: dict[int, float], min_gain: float = 0.1) -> int:
    """From total images/s measured with K cells packed ({K: images/s}, scripts/gpu-check), the smallest K
    within `min_gain` of the best: more cells than that add memory and CPU load for less than 10% more."""
    best = max(images_per_s.values())
    return min(k for k, rate in images_per_s.items() if rate * (1 + min_gain) >= best)
