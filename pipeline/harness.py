"""The measurement harness of `bench` (pipeline.bench) and scripts/gpu-check (pipeline.gpu_check): a cell's
training step on synthetic inputs, and timing and counting that make the host wait for the device only where
they read a clock.

Inputs are random uint8 images already on the device, augmented there (pipeline.augment's torch path) as
pretraining does on a GPU.
"""

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.augment import augment_torch, draw
from pipeline.model import build_model, make_optimizer
from pipeline.run import Run
from pipeline.step import Forward, backward, forward, gradient_ratio


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(run: Run, batch_size: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    """uint8 images (N, 3, S, S) as the loader gives them (S: the crop size; the decoder crops ImageNet) and labels."""
    generator = torch.Generator(device).manual_seed(seed)
    images = torch.randint(
        0, 256, (batch_size, 3, run.crop_size, run.crop_size), dtype=torch.uint8, device=device, generator=generator
    )
    return images, torch.randint(0, run.num_classes, (batch_size,), device=device, generator=generator)


def augment_views(
    run: Run,
    images: Tensor,
    generator: torch.Generator,
    stats: tuple[Tensor, Tensor],
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[Tensor, Tensor]:
    """The two augmented, normalized float32 views of uint8 `images`, as pretraining makes them on a GPU;
    `stats`: run.stats(device), made once (a copy to the device per step would make the host wait)."""
    n, hw = len(images), (images.shape[-2], images.shape[-1])
    a, b = (
        augment_torch(images, view, draw(n, hw, view, generator), *stats).contiguous(memory_format=memory_format)
        for view in run.views()
    )
    return a, b


class Trainer:
    """A cell's model and LARS, and pretraining's step: both views augmented on the device, forward, backward, LARS.
    `wrap` makes the module the step runs from the model (torch.compile, pretraining's DDP wrapping)."""

    def __init__(
        self,
        run: Run,
        device: torch.device,
        channels_last: bool = False,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        seed: int = 0,
    ):
        torch.manual_seed(seed)
        self.run, self.device = run, device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = build_model(run).to(device).to(memory_format=self.memory_format)
        self.optimizer = make_optimizer(self.model, run)
        self.trained = wrap(self.model) if wrap else self.model
        self.set_lr(1.0)
        self.parameters = list(self.model.parameters())
        self.generator = torch.Generator(device).manual_seed(seed)
        self.stats = run.stats(device)

    def set_lr(self, fraction: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = fraction * group["base_lr"]

    def augment(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return augment_views(self.run, images, self.generator, self.stats, self.memory_format)

    def step(self, images: Tensor, y: Tensor, ratio: bool = False) -> tuple[Forward, Tensor | None]:
        """One step from uint8 images; with `ratio`, also the regularizer's gradient ratio (an epoch's first step)."""
        return self.step_on_views(*self.augment(images), y, ratio)

    def step_on_views(self, x_a: Tensor, x_b: Tensor, y: Tensor, ratio: bool = False) -> tuple[Forward, Tensor | None]:
        """One step from the two augmented, normalized views."""
        out = forward(self.trained, self.run, x_a, x_b, y)
        measured = gradient_ratio(out, self.run) if ratio else None
        self.optimizer.zero_grad(set_to_none=True)
        backward(out, self.run, self.parameters)
        self.optimizer.step()
        return out, measured


def images_per_second(
    step: Callable[[], object],
    batch_size: int,
    device: torch.device,
    seconds: float,
    warmup: int = 3,
    ready: Callable[[], None] = lambda: None,
) -> dict:
    """Images/s of `step` over about `seconds`, after `warmup` steps and `ready()` (a barrier); the host never
    waits for the device inside the timed loop, only once at its end."""
    for _ in range(warmup):
        step()
    synchronize(device)
    ready()
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    synchronize(device)
    elapsed = time.perf_counter() - start
    return {"images_per_s": steps * batch_size / elapsed, "steps": steps, "step_ms": 1000 * elapsed / steps}


def seconds_per_call(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Mean seconds of `fn` over `repeats` calls after one to warm up; one wait for the device at the end."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def launches(fn: Callable[[], object], device: torch.device) -> dict:
    """What one call of `fn` asks of the device (torch.profiler): `ops`, the operators it calls from Python (each
    one kernel launch on a GPU, a fused foreach op included); `ops_nested`, every operator, also those that
    operators call (a CPU runs a foreach op as one operator per tensor); on CUDA `cuda_kernels`, the kernels,
    copies and fills that ran on the device."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as profiler:
        fn()
        synchronize(device)
    events = profiler.events()
    ops = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
    top = [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    counted: dict[str, Any] = {"ops": len(top), "ops_nested": len(ops)}
    if device.type == "cuda":
        counted["cuda_kernels"] = sum(e.device_type == DeviceType.CUDA for e in events)
    return counted


@contextlib.contextmanager
def cudnn_flags(**flags: bool) -> Iterator[None]:
    """torch.backends.cudnn's `flags` (allow_tf32, benchmark) set inside the block, restored after it."""
    saved = {name: getattr(torch.backends.cudnn, name) for name in flags}
    try:
        for name, value in flags.items():
            setattr(torch.backends.cudnn, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.backends.cudnn, name, value)
