"""Self-supervised pretraining of one cell (dataset × method × variant × seed), resumable per epoch.

The step is `pipeline.step`; this module runs the epochs: learning-rate schedule, augmentation on the
device, per-epoch averages of the logged values (read from the device every SYNC_EVERY steps, not every
step), the gradient ratio of the regularizer on the first batch of each epoch, the online classifier's test
accuracy, and an atomic checkpoint plus log.csv after every epoch.
"""

import logging
import math
import time
from pathlib import Path
from typing import cast

import torch
from torch import nn

from pipeline.atomic import atomic_file
from pipeline.augment import augment
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.distributed import data_parallel, rank, sum_over_ranks
from pipeline.errors import UserError
from pipeline.loaders import Batches, eval_loader, ssl_loader
from pipeline.metrics import EpochLog, EpochValues, PretrainMetrics, write_log
from pipeline.model import DEPENDS_ON_WORLD_SIZE, SSLModel, build_model, make_optimizer
from pipeline.optim import LARS, warmup_cosine
from pipeline.params import TrainingParams
from pipeline.progress import progress
from pipeline.run import Run
from pipeline.runtime import autocast, is_rank0, prepare_convolutions, seconds_since_start, world_size
from pipeline.step import LOGGED, backward, forward, gradient_ratio

log = logging.getLogger(__name__)
SYNC_EVERY = 20  # steps between reads of the logged values (progress, non-finite check): one host sync each


def pretrain(
    run: Run, training: TrainingParams, data: Path, out: Path, device: torch.device, code_version: str
) -> PretrainMetrics:
    """Train, writing `out/checkpoint.pt` and `out/log.csv` after every epoch; return the last epoch's metrics.

    An existing checkpoint of the same config is resumed from its last completed epoch.
    """
    torch.manual_seed(run.seed)
    model = build_model(run).to(device)
    memory_format = prepare_convolutions(training.channels_last, device)
    model = model.to(memory_format=memory_format)
    optimizer = make_optimizer(model, run)
    start_epoch, history = _resume(out / "checkpoint.pt", run, model, optimizer)
    trained = data_parallel(model, device)
    if training.compile:
        trained = cast(nn.Module, torch.compile(trained))
    if run.common.batch_size % world_size():
        raise UserError(f"batch_size {run.common.batch_size} does not split evenly over {world_size()} processes")
    loader = ssl_loader(
        data / "train.beton",
        run.common.batch_size // world_size(),
        seed=run.seed,
        workers=training.loader_workers,
        crop_size=run.decoder_crop,
        device=device,
        crop_scales=tuple(tuple(v.crop_scale) for v in (run.augmentation.view_a, run.augmentation.view_b)),
        distributed=world_size() > 1,
    )
    if len(loader) == 0:
        raise UserError(f"batch_size {run.common.batch_size} is larger than the training set")
    test = eval_loader(
        data / "test.beton",
        training.eval_batch_size,
        workers=training.loader_workers,
        crop_size=run.decoder_crop,
        device=device,
    )
    for epoch in range(start_epoch, run.common.epochs):
        loader.set_epoch(epoch)
        row = _train_epoch(trained, model, loader, optimizer, run, epoch, start_epoch, memory_format, device)
        row = row.model_copy(update={"online_test_acc": evaluate(model, test, run, device)})
        history.append(row)
        log.info(
            "epoch %d/%d: %s",
            epoch + 1,
            run.common.epochs,
            ", ".join(f"{k} {v:.4g}" for k, v in row.model_dump().items() if k != "epoch"),
        )
        if is_rank0():
            _save(out, model, optimizer, run, history, code_version)
    if is_rank0() and start_epoch == run.common.epochs:  # a finished run resumed: DVC removed log.csv before the stage
        _write_log(out, history)
    return PretrainMetrics(
        dataset=run.dataset,
        method=run.method,
        variant=run.variant.name,
        seed=run.seed,
        epochs=run.common.epochs,
        precision=run.precision,
        mi_weight=run.variant.mi_weight,
        mi_grad_fp32=run.variant.mi_grad_fp32,
        mi_grad_ratio_max=max(row.mi_grad_ratio for row in history),
        **history[-1].model_dump(include=set(EpochValues.model_fields)),
    )


def _train_epoch(
    trained: nn.Module,
    model: SSLModel,
    loader: Batches,
    optimizer: LARS,
    run: Run,
    epoch: int,
    start_epoch: int,
    memory_format: torch.memory_format,
    device: torch.device,
) -> EpochLog:
    steps = len(loader)
    total_steps, warmup_steps = run.common.epochs * steps, run.common.warmup_epochs * steps
    views, stats = run.views(), run.stats(device)
    generator = torch.Generator(device).manual_seed(run.augmentation_seed(epoch, rank()))  # per sample, rank, epoch
    parameters = list(model.parameters())
    model.train()
    start, seen, pending, sums = time.perf_counter(), 0, [], [0.0] * len(LOGGED)
    ratio = torch.zeros((), device=device)
    with progress(f"epoch {epoch + 1}/{run.common.epochs}", steps, "steps") as advance:
        for step, (x_a, x_b, y) in enumerate(loader):
            if step == 0 and epoch == start_epoch:
                log.info("first training batch ready %.1f s after the process started", seconds_since_start())
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(
                    epoch * steps + step, total_steps, warmup_steps, group["base_lr"], run.optimizer.warmup_start_lr
                )
            x_a, x_b = (
                augment(x, view, *stats, generator).contiguous(memory_format=memory_format)
                for x, view in zip((x_a, x_b), views)
            )
            out = forward(trained, run, x_a, x_b, y)
            if step == 0:
                ratio = gradient_ratio(out, run)
            optimizer.zero_grad(set_to_none=True)
            backward(out, run, parameters)
            optimizer.step()
            pending.append(out.logged)
            seen += len(y) * world_size()
            if len(pending) == SYNC_EVERY or step + 1 == steps:
                # the global batch's values (the mean over ranks), read in the one host sync of SYNC_EVERY steps
                rows = (sum_over_ranks(torch.stack(pending)) / world_size()).tolist()
                _check_finite(rows, epoch, step + 1 - len(rows))
                sums = [total + sum(column) for total, column in zip(sums, zip(*rows))]
                advance(
                    len(rows), f"loss {sums[0] / (step + 1):.4f}  {seen / (time.perf_counter() - start):.0f} images/s"
                )
                pending = []
    means = {name: total / steps for name, total in zip(LOGGED, sums)}
    return EpochLog(
        epoch=epoch + 1,
        **means,
        lower_bound=means["mi_z1_r_estimate"] - means["mi_z1_z2"],
        upper_bound=means["entropy_z1"] - means["mi_z1_z2"],
        mi_grad_ratio=ratio.item(),
        online_test_acc=0.0,
        lr=optimizer.param_groups[0]["lr"],
        images_per_s=seen / (time.perf_counter() - start),
    )


def _check_finite(rows: list[list[float]], epoch: int, first_step: int) -> None:
    """Stop on a non-finite loss in `rows` (steps × LOGGED, from step `first_step` on, 0-based)."""
    for step, row in enumerate(rows, first_step + 1):
        if not math.isfinite(row[0]):
            raise UserError(
                f"non-finite loss at epoch {epoch + 1}, step {step}: stopping; the last good checkpoint "
                "is kept (lower the learning rate or check the data)"
            )


@torch.no_grad()
def evaluate(model: SSLModel, batches: Batches, run: Run, device: torch.device) -> float:
    """Top-1 accuracy of the online classifier over `batches` (an eval loader: every image once)."""
    model.eval()
    mean, std = run.stats(device)
    correct, total = torch.zeros((), device=device), 0
    for x, y in batches:
        x = (x.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        with autocast(run.precision, device.type):
            logits = model.classifier(model.backbone(x))
        correct += (logits.argmax(1) == y).sum()
        total += len(y)
    model.train()
    return correct.item() / total


def _resume(path: Path, run: Run, model: SSLModel, optimizer: LARS) -> tuple[int, list[EpochLog]]:
    if not path.exists():
        return 0, []
    state = load_checkpoint(path, "remove it to start this run over")
    if state.get("config") != run.config():
        log.warning("%s was written for other params: starting over", path)
        return 0, []
    trained_by = state.get("world_size", 1)
    if trained_by != world_size() and run.method in DEPENDS_ON_WORLD_SIZE:
        raise UserError(
            f"{path} was trained by {trained_by} processes, and this run has {world_size()}: {run.method}'s training "
            f"depends on their number (docs/method.md 3.2); resume it with {trained_by} (launch's --gpus-per-cell, "
            f"PROJECTOR_IB_NPROC) or remove it to start over"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming from %s after epoch %d (trained by %d processes)", path, state["epoch"], trained_by)
    return state["epoch"], [EpochLog(**row) for row in state["history"]]


def _save(out: Path, model: SSLModel, optimizer: LARS, run: Run, history: list[EpochLog], code_version: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "checkpoint.pt") as staging:
        save_checkpoint(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": history[-1].epoch,
                "history": [row.model_dump() for row in history],
                "config": run.config(),
                "world_size": world_size(),
                "code_version": code_version,
            },
            staging,
        )
    _write_log(out, history)


def _write_log(out: Path, history: list[EpochLog]) -> None:
    with atomic_file(out / "log.csv") as staging:
        write_log(staging, history)
