"""The measurements of scripts/gpu-check: the CUDA path of a training step, timed and checked on any device.

Each function takes a run (pipeline.run) and plain values and returns a dict of numbers for the JSON report.
Inputs are random uint8 images already on the device, augmented there (pipeline.augment's torch path) as
pretraining does: no dataset and no FFCV are needed, except by `loader_rate`.
"""

import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.augment import augment_torch, draw
from pipeline.distributed import SyncBatchNorm, all_gather, data_parallel
from pipeline.metrics import DatasetMetrics
from pipeline.model import build_model, make_optimizer
from pipeline.optim import warmup_cosine
from pipeline.params import UNIT_ROUNDOFF, Params
from pipeline.run import Run, make_run
from pipeline.step import LOGGED, Forward, backward, forward, gradient_ratio


def check_run(params: Params, dataset: str, method: str, variant: str, width: int | None, precision: str) -> Run:
    """The run of a cell of `params` at backbone `width` (None: as params) and `precision`, without its data:
    10 classes (the online classifier's size barely matters here) and the dataset's published statistics."""
    meta = DatasetMetrics.model_validate(
        {
            "dataset": dataset,
            "classes": [f"class_{k}" for k in range(10)],
            "num_classes": 10,
            "storage": {},
            "sources_sha256": {},
            "train": {"count": 0, "per_class": [0] * 10},
            "test": {"count": 0, "per_class": [0] * 10},
            "image_shape": None,
            "mean": None,
            "std": None,
        }
    )
    run = make_run(params, dataset, method, variant, 0, meta, torch.device("cpu"))
    common = run.common.model_copy(update={"backbone_width": width}) if width else run.common
    return dataclasses.replace(run, precision=precision, common=common)


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
    """A cell's model and LARS, and pretraining's step: both views augmented on the device, forward, backward, LARS."""

    def __init__(
        self, run: Run, device: torch.device, channels_last: bool = False, compiled: bool = False, seed: int = 0
    ):
        torch.manual_seed(seed)
        self.run, self.device = run, device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = build_model(run).to(device).to(memory_format=self.memory_format)
        self.trained = cast(nn.Module, torch.compile(self.model)) if compiled else self.model
        self.optimizer = make_optimizer(self.model, run)
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def step_rate(
    run: Run, batch_size: int, device: torch.device, seconds: float, channels_last: bool = False, compiled: bool = False
) -> dict:
    """Training images/s of the full step (augmentation included); compiled: also the first step's seconds."""
    trainer = Trainer(run, device, channels_last, compiled)
    images, y = random_batch(run, batch_size, device)
    start = time.perf_counter()
    trainer.step(images, y)
    synchronize(device)
    first = time.perf_counter() - start
    result = images_per_second(lambda: trainer.step(images, y), batch_size, device, seconds, warmup=2)
    return result | {"first_step_s": first}


def augmentation_rate(run: Run, batch_size: int, device: torch.device, seconds: float) -> dict:
    """Images/s of the device augmentation of both views (pipeline.augment's torch path)."""
    images, _ = random_batch(run, batch_size, device)
    generator, stats = torch.Generator(device).manual_seed(0), run.stats(device)
    return images_per_second(lambda: augment_views(run, images, generator, stats), batch_size, device, seconds)


def peak_memory(run: Run, batch_size: int, device: torch.device, channels_last: bool) -> int:
    """CUDA bytes allocated at the peak of two steps of a new model (as pipeline.memory estimates them), beyond
    what was allocated before."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(run, device, channels_last)
    images, y = random_batch(run, batch_size, device)
    for _ in range(2):
        trainer.step(images, y, ratio=True)
    synchronize(device)
    del trainer, images, y
    return torch.cuda.max_memory_allocated(device) - before


def precision_drift(run: Run, batch_size: int, device: torch.device, steps: int, channels_last: bool) -> dict:
    """bf16 against fp32 from one seed on the same batches: the logged values (SSL loss, I(Z1;Z2), ...) step by
    step, with the learning rate's warmup and cosine over `steps` steps."""
    logged, ratios = {}, {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(dataclasses.replace(run, precision=precision), device, channels_last)
        rows = []
        for step in range(steps):
            trainer.set_lr(warmup_cosine(step, steps, steps // 5, 1.0, run.optimizer.warmup_start_lr))
            images, y = random_batch(run, batch_size, device, seed=step % 4)  # a pool of 4 batches
            out, ratio = trainer.step(images, y, ratio=step == 0)
            if step == 0:
                ratios[precision] = ratio
            rows.append(out.logged)
        logged[precision] = torch.stack(rows).double().cpu()  # (steps, len(LOGGED))
    fp32, bf16 = logged["fp32"], logged["bf16"]
    relative = (bf16 - fp32).abs() / fp32.abs().clamp(min=1e-12)
    result: dict[str, object] = {
        "steps": steps,
        "finite": bool(torch.isfinite(fp32).all() and torch.isfinite(bf16).all()),
        "mi_grad_ratio_bf16": float(ratios["bf16"] or 0.0),
        "bf16_unit_roundoff": UNIT_ROUNDOFF["bf16"],
    }
    for name in ("ssl_loss", "mi_z1_z2"):
        column = LOGGED.index(name)
        result[name] = {
            "fp32_last": fp32[-1, column].item(),
            "bf16_last": bf16[-1, column].item(),
            "relative_diff_first": relative[0, column].item(),
            "relative_diff_max": relative[:, column].max().item(),
            "relative_diff_last": relative[-1, column].item(),
        }
    return result


def layout_gradient_errors(
    run: Run, batch_size: int, device: torch.device, layouts: tuple[str, ...], tf32: tuple[bool, ...]
) -> dict:
    """Backbone gradients of the SSL loss in fp32, contiguous or channels_last, with TF32 convolutions on or off
    (cuDNN), against float64 contiguous: relative error ‖g − g64‖ / ‖g64‖. Same weights and batch in all."""
    run = dataclasses.replace(run, precision="fp32")
    torch.manual_seed(0)
    model = build_model(run).to(device)
    images, y = random_batch(run, batch_size, device)
    x = augment_views(run, images, torch.Generator(device).manual_seed(0), run.stats(device))

    def gradient(dtype: torch.dtype, memory_format: torch.memory_format) -> Tensor:
        copied = copy.deepcopy(model).to(dtype=dtype).to(memory_format=memory_format)  # type: ignore[call-overload]
        view_a, view_b = (v.to(dtype).contiguous(memory_format=memory_format) for v in x)
        out = forward(copied, run, view_a, view_b, y)
        grads = torch.autograd.grad(out.ssl, list(copied.backbone.parameters()))
        return torch.cat([g.double().flatten() for g in grads])

    reference = gradient(torch.float64, torch.contiguous_format)
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    allowed = torch.backends.cudnn.allow_tf32
    errors = {}
    try:
        for on in tf32:
            torch.backends.cudnn.allow_tf32 = on
            for layout in layouts:
                g = gradient(torch.float32, formats[layout])
                errors[f"{layout}{'_tf32' if on else ''}"] = ((g - reference).norm() / reference.norm()).item()
    finally:
        torch.backends.cudnn.allow_tf32 = allowed
    return {"relative_error_vs_float64": errors, "batch_size": batch_size}


def sync_free_step(run: Run, batch_size: int, device: torch.device, channels_last: bool) -> dict:
    """One training step (with the gradient ratio) under torch.cuda.set_sync_debug_mode("error"): any operation
    that makes the host wait for the GPU raises. Warmed up first (first calls copy constants to the device)."""
    trainer = Trainer(run, device, channels_last)
    images, y = random_batch(run, batch_size, device)
    trainer.step(images, y, ratio=True)
    synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.step(images, y, ratio=True)
    except RuntimeError as e:  # what sync debug mode raises
        return {"sync_free": False, "error": str(e).splitlines()[0]}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {"sync_free": True}


def distributed_smoke(run: Run, batch_size: int, device: torch.device, port: int) -> dict:
    """A world-size-1 NCCL group: the autograd-aware all_gather (SimCLR's keys, the MI's batch); the pipeline's
    SyncBatchNorm (which synchronizes at world size 1 too) against plain batch norm, and whether its forward and
    backward make the host wait; one step of `run` through `data_parallel` (as pretraining wraps it) against the
    same step without."""
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=device)
    try:
        x = torch.randn(8, 4, device=device, requires_grad=True)
        gathered = all_gather(x)
        (gathered * 2).sum().backward()
        result: dict[str, object] = {
            "all_gather_ok": torch.equal(gathered, x)
            and x.grad is not None
            and torch.equal(x.grad, torch.full_like(x, 2))
        }

        h = torch.randn(16, 8, 4, 4, device=device, requires_grad=True)
        sync_bn = SyncBatchNorm.from_batch_norm(nn.BatchNorm2d(8).to(device))
        with torch.no_grad():
            sync_bn.weight.uniform_(0.5, 1.5), sync_bn.bias.uniform_(-1, 1)
        weight, bias = sync_bn.weight, sync_bn.bias

        def sync_batch_norm() -> tuple[Tensor, ...]:
            out = sync_bn(h)
            return (out, *torch.autograd.grad(out.square().sum(), (h, weight, bias)))

        plain = F.batch_norm(h, None, None, weight, bias, training=True, eps=1e-5)
        expected = (plain, *torch.autograd.grad(plain.square().sum(), (h, weight, bias)))
        result["sync_batch_norm_max_abs_diff"] = max(
            (a - b).abs().max().item() for a, b in zip(sync_batch_norm(), expected)
        )
        torch.cuda.set_sync_debug_mode("error")
        try:
            sync_batch_norm()
            result["sync_batch_norm_waits_for_host"] = False
        except RuntimeError:
            result["sync_batch_norm_waits_for_host"] = True
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return result | {"ddp_step_max_relative_diff": _ddp_step_difference(run, batch_size, device)}
    finally:
        dist.destroy_process_group()


def _ddp_step_difference(run: Run, batch_size: int, device: torch.device) -> float:
    """Largest relative difference of the parameters after one step with and without `data_parallel`."""
    images, y = random_batch(run, batch_size, device)
    plain, wrapped = Trainer(run, device), Trainer(run, device)
    wrapped.trained = data_parallel(wrapped.model, device)
    for trainer in (plain, wrapped):
        trainer.step(images, y)
    return max(
        ((a - b).norm() / a.norm().clamp(min=1e-12)).item()
        for a, b in zip(plain.model.parameters(), wrapped.model.parameters())
    )


def loader_rate(
    run: Run, batch_size: int, device: torch.device, seconds: float, folder: Path, count: int = 20_000
) -> dict:
    """Images/s of pretraining's FFCV loader (two views to the device, pipeline.loaders.ssl_loader) over `count`
    random 32-px images stored as raw pixels, like CIFAR, in `folder`. Needs FFCV."""
    from pipeline.beton import write_beton
    from pipeline.datasets import RAW
    from pipeline.datasets.splits import ArraySplit
    from pipeline.loaders import ssl_loader

    rng = np.random.default_rng(0)
    split = ArraySplit(rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, count))
    write_beton(split, folder / "train.beton", RAW)
    scales = [view.crop_scale for view in (run.augmentation.view_a, run.augmentation.view_b)]
    loader = ssl_loader(folder / "train.beton", batch_size, seed=0, crop_scales=scales, workers=-1, device=device)
    batches = (batch for _ in iter(int, 1) for batch in loader)  # epochs without end
    try:
        return images_per_second(lambda: next(batches), batch_size, device, seconds)
    finally:
        batches.close()  # stops FFCV's loading thread
