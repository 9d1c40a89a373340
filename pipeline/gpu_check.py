"""The measurements of scripts/gpu-check: the CUDA path of a training step, timed and checked on any device.

Each function takes a run (pipeline.run) and plain values and returns a dict of numbers for the JSON report.
Inputs are random uint8 images already on the device, augmented there (pipeline.augment's torch path) as
pretraining does (pipeline.harness): no dataset and no FFCV are needed, except by `loader_rate`. What needs
several processes or a process group is in pipeline.gpu_check_distributed.
"""

import copy
import dataclasses
import time
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.augment import ViewSpec, augment
from pipeline.fit import train
from pipeline.harness import (
    Trainer,
    augment_views,
    cudnn_flags,
    images_per_second,
    launches,
    random_batch,
    seconds_per_call,
    synchronize,
)
from pipeline.metrics import DatasetMetrics
from pipeline.model import LOSSES, build_backbone, build_model
from pipeline.optim import warmup_cosine
from pipeline.params import UNIT_ROUNDOFF, OptimizerParams, Params, ProtocolParams, ViewParams
from pipeline.run import Run, make_run
from pipeline.runtime import autocast, prepare_convolutions
from pipeline.step import LOGGED, forward


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


def step_rate(
    run: Run, batch_size: int, device: torch.device, seconds: float, channels_last: bool = False, compiled: bool = False
) -> dict:
    """Training images/s of the full step (augmentation included); compiled: also the first step's seconds."""
    trainer = Trainer(run, device, channels_last, _compiled if compiled else None)
    images, y = random_batch(run, batch_size, device)
    start = time.perf_counter()
    trainer.step(images, y)
    synchronize(device)
    first = time.perf_counter() - start
    result = images_per_second(lambda: trainer.step(images, y), batch_size, device, seconds, warmup=2)
    return result | {"first_step_s": first}


def _compiled(model: nn.Module) -> nn.Module:
    return cast(nn.Module, torch.compile(model))


def augmentation_rate(run: Run, batch_size: int, device: torch.device, seconds: float) -> dict:
    """Images/s of the device augmentation of both views (pipeline.augment's torch path), at the run's crop size."""
    images, _ = random_batch(run, batch_size, device)
    generator, stats = torch.Generator(device).manual_seed(0), run.stats(device)
    rate = images_per_second(lambda: augment_views(run, images, generator, stats), batch_size, device, seconds)
    return rate | {"size_px": run.crop_size, "batch_size": batch_size}


def lars_launches(run: Run, batch_size: int, device: torch.device, channels_last: bool, repeats: int = 20) -> dict:
    """LARS's step over the run's model (pipeline.optim) after a training step: what one step launches
    (harness.launches: on CUDA, `cuda_kernels`) and its milliseconds."""
    trainer = Trainer(run, device, channels_last)
    images, y = random_batch(run, batch_size, device)
    trainer.step(images, y)  # gradients, and the momentum buffers' first step
    counted = launches(trainer.optimizer.step, device)
    step_ms = 1000 * seconds_per_call(trainer.optimizer.step, repeats, device)
    return {"parameter_tensors": len(trainer.parameters), **counted, "step_ms": step_ms}


def loss_precision_cost(run: Run, batch_size: int, device: torch.device, repeats: int) -> dict:
    """Milliseconds of the SSL loss's forward and backward on a step's projections (two (batch, out_dim) bf16
    tensors, as the projector gives them under autocast): under bf16 autocast, and in fp32 from z.float()
    outside autocast (issue 18 item 5)."""
    loss = LOSSES[run.method](run.common)
    z = torch.randn(2, batch_size, run.common.projector_out_dim, device=device, generator=_generator(device))
    z_a, z_b = (v.bfloat16().requires_grad_() for v in z)

    def bf16() -> None:
        with autocast("bf16", device.type):
            value = loss(z_a, z_b)
        value.backward()

    bf16_ms = 1000 * seconds_per_call(bf16, repeats, device)
    fp32_ms = 1000 * seconds_per_call(lambda: loss(z_a.float(), z_b.float()).backward(), repeats, device)
    return {"shape": list(z.shape), "bf16_ms": bf16_ms, "fp32_ms": fp32_ms, "fp32_over_bf16": fp32_ms / bf16_ms}


def finetune_rate(
    run: Run,
    setting: ProtocolParams,
    view: ViewParams,
    optimizer: OptimizerParams,
    device: torch.device,
    *,
    batch_size: int,
    seconds: float,
    channels_last: bool,
) -> dict:
    """Images/s of the `finetune` protocol's training (pipeline.fit.train, as linear evaluation runs it: encoder
    and classifier on crops + flips made on the device, the run's precision, prepare_convolutions' layout and
    cuDNN settings) over about `seconds`."""
    with cudnn_flags(benchmark=torch.backends.cudnn.benchmark):  # restores what prepare_convolutions sets
        memory_format = prepare_convolutions(channels_last, device)
        backbone = build_backbone(run)
        model = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, run.num_classes))
        model = model.to(device).to(memory_format=memory_format)
        spec = ViewSpec.from_params(view, run.crop_size, crop=not run.decoder_crops)
        images, y = random_batch(run, batch_size, device)
        stats, generator = run.stats(device), _generator(device)
        fit = setting.model_copy(update={"epochs": 1, "batch_size": batch_size})

        def seconds_of(steps: int) -> float:
            def batches(epoch: int):
                for _ in range(steps):
                    yield augment(images, spec, *stats, generator).contiguous(memory_format=memory_format), y

            start = time.perf_counter()
            train(model, batches, steps, fit, optimizer, run.precision, "finetune")
            synchronize(device)
            return time.perf_counter() - start

        warm = seconds_of(3) / 3  # cuDNN's timing of its algorithms included: an overestimate
        steps = max(3, int(seconds / warm))
        elapsed = seconds_of(steps)
    return {"images_per_s": steps * batch_size / elapsed, "steps": steps, "step_ms": 1000 * elapsed / steps}


def _generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device).manual_seed(0)


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
    step, with the learning rate's warmup and cosine over `steps` steps. fp32 is IEEE fp32: cuDNN's TF32
    convolutions (on by default) are turned off."""
    logged, ratios = {}, {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(dataclasses.replace(run, precision=precision), device, channels_last)
        rows = []
        with cudnn_flags(allow_tf32=False):
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
    errors = {}
    for on in tf32:
        with cudnn_flags(allow_tf32=on):
            for layout in layouts:
                g = gradient(torch.float32, formats[layout])
                errors[f"{layout}{'_tf32' if on else ''}"] = ((g - reference).norm() / reference.norm()).item()
    return {"relative_error_vs_float64": errors, "batch_size": batch_size}


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
