"""Self-supervised pretraining of one cell (dataset × method × variant × seed), resumable per epoch.

Per step (PAPER.md sections 3-4): two augmented views -> backbone h (Z1) -> projector z (Z2, after
the optional SAE and quantizer) -> SSL loss (+ λ·I(Z1;Z2) for the MI variant) + the online linear
classifier's loss on detached features. Logged per step and averaged per epoch: I(Z1;Z2), H(K1),
I(Z1;R) = −SSL loss on Z1, the lower bound I(Z1;R) − I(Z1;Z2), the upper bound H(K1) − I(Z1;Z2).
"""

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.atomic import atomic_file
from pipeline.augment import ViewSpec, augment
from pipeline.backbones import resnet18
from pipeline.errors import UserError
from pipeline.loaders import eval_loader, ssl_loader
from pipeline.losses import barlow_twins, nt_xent, world_size
from pipeline.mutual_info import gram, matrix_mutual_info, renyi_entropy
from pipeline.optim import LARS, warmup_cosine
from pipeline.datasets import get_dataset
from pipeline.params import (AugmentationParams, CellParams, OptimizerParams, Params, TrainingParams, VariantParams,
                             ViewParams)
from pipeline.progress import progress
from pipeline.projectors import HEADS, Projector
from pipeline.runtime import is_rank0

log = logging.getLogger(__name__)
COLUMNS = ("epoch", "ssl_loss", "mi_z1_z2", "mi_z1_r", "lower_bound", "upper_bound", "entropy_z1",
           "online_train_acc", "online_test_acc", "lr", "images_per_s")
LOSSES: dict[str, Callable[[CellParams], Callable[[Tensor, Tensor], Tensor]]] = {
    "simclr": lambda cell: partial(nt_xent, temperature=cell.temperature),
    "barlow_twins": lambda cell: partial(barlow_twins, offdiag_weight=cell.offdiag_weight, scale=cell.loss_scale),
}


class SSLModel(nn.Module):
    def __init__(self, backbone: nn.Module, projector: nn.Module, num_classes: int):
        super().__init__()
        self.backbone, self.projector = backbone, projector
        self.classifier = nn.Linear(backbone.feature_dim, num_classes)  # online monitor, on detached h

    def forward(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, ...]:
        """Each view through the backbone separately (batch statistics per view, as the reference)."""
        h_a, h_b = self.backbone(x_a), self.backbone(x_b)  # (N, F) each
        z_a, z_b = self.projector(h_a), self.projector(h_b)  # (N, D) each
        return h_a, h_b, z_a, z_b, self.classifier(torch.cat([h_a, h_b]).detach())


def build_model(method: str, cell: CellParams, variant: VariantParams, stem: str, num_classes: int) -> SSLModel:
    backbone = resnet18(stem, cell.backbone_width)
    sae = (cell.sae_latent_dim, cell.sae_topk) if variant.sae else None
    head = HEADS[method](backbone.feature_dim, cell.projector_hidden_dim, cell.projector_out_dim, sae)
    return SSLModel(backbone, Projector(head, cell.levels if variant.discrete else 0), num_classes)


@dataclass(frozen=True)
class Run:
    """Everything that determines one pretraining run's numbers (stored in its checkpoint)."""

    method: str
    seed: int
    cell: CellParams
    variant: VariantParams
    augmentation: AugmentationParams
    optimizer: OptimizerParams
    training: TrainingParams
    stem: str
    crop_size: int
    decoder_crops: bool  # the FFCV decoder makes the random crop (ImageNet); else the device does
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def config(self) -> dict:
        return {name: (value.model_dump() if hasattr(value, "model_dump") else value)
                for name, value in self.__dict__.items() if name != "training"} | {"world_size": world_size()}

    def view(self, params: ViewParams) -> ViewSpec:
        return ViewSpec(self.crop_size, crop=not self.decoder_crops, crop_scale=tuple(params.crop_scale),
                        interpolation=params.interpolation, flip_p=params.flip_p, jitter=tuple(params.jitter),
                        jitter_p=params.jitter_p, grayscale_p=params.grayscale_p, blur_p=params.blur_p,
                        blur_sigma=tuple(params.blur_sigma), solarize_p=params.solarize_p)


def make_run(params: Params, dataset: str, method: str, variant: str, seed: int, meta: dict) -> Run:
    """The run of one cell; `meta` is the dataset's conversion metadata (classes, pixel statistics)."""
    if variant not in params.variants:
        raise UserError(f"unknown variant {variant!r}; choose from {', '.join(params.variants)}")
    if method not in LOSSES:
        raise UserError(f"unknown method {method!r}; choose from {', '.join(LOSSES)}")
    spec = get_dataset(dataset)
    cell = getattr(getattr(params.pretrain, dataset), method)
    mean, std = spec.stats or (tuple(meta["mean"]), tuple(meta["std"]))
    return Run(method=method, seed=seed, cell=cell, variant=params.variants[variant],
               augmentation=params.augmentations[cell.augmentation], optimizer=params.optimizer,
               training=params.training, stem=spec.stem, crop_size=spec.crop_size,
               decoder_crops=spec.stem == "imagenet", num_classes=meta["num_classes"], mean=mean, std=std)


def pretrain(run: Run, data: Path, out: Path, device: torch.device, code_version: str) -> dict:
    """Train, writing `out/checkpoint.pt` (every epoch) and `out/log.csv`; return the final metrics.

    An existing checkpoint of the same config is resumed from its last completed epoch.
    """
    torch.manual_seed(run.seed)
    model = build_model(run.method, run.cell, run.variant, run.stem, run.num_classes).to(device)
    if run.training.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, run)
    start_epoch, history = _resume(out / "checkpoint.pt", run, model, optimizer)
    trained = _distributed(model, device)
    if run.training.compile:
        trained = torch.compile(trained)
    if run.cell.batch_size % world_size():
        raise UserError(f"batch_size {run.cell.batch_size} does not split evenly over {world_size()} processes")
    batch = run.cell.batch_size // world_size()
    loader = ssl_loader(data / "train.beton", batch, seed=run.seed, workers=run.training.loader_workers,
                        crop_size=run.crop_size if run.decoder_crops else None, device=device,
                        crop_scales=(tuple(run.augmentation.view_a.crop_scale), tuple(run.augmentation.view_b.crop_scale)),
                        distributed=world_size() > 1)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise UserError(f"batch_size {run.cell.batch_size} is larger than the training set")
    test = eval_loader(data / "test.beton", run.training.eval_batch_size, workers=run.training.loader_workers,
                       crop_size=run.crop_size if run.decoder_crops else None, device=device)
    stats = (torch.tensor(run.mean, device=device), torch.tensor(run.std, device=device))
    for epoch in range(start_epoch, run.cell.epochs):
        loader.loader.next_epoch = epoch  # FFCV's shuffle order is a function of (seed, epoch)
        row = _train_epoch(trained, model, loader, optimizer, run, epoch, steps_per_epoch, stats, device)
        row["online_test_acc"] = evaluate(model, test, run.training, stats, device)
        history.append(row)
        log.info("epoch %d/%d: %s", epoch + 1, run.cell.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
        if is_rank0():
            _save(out, model, optimizer, run, history, code_version)
    if is_rank0() and start_epoch == run.cell.epochs:  # a finished run resumed: DVC removed log.csv before the stage
        _write_log(out, history)
    return {k: v for k, v in history[-1].items() if k != "images_per_s"} | {"epochs": run.cell.epochs}


def _optimizer(model: SSLModel, run: Run) -> LARS:
    o = run.optimizer
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("classifier.")],
               "base_lr": run.cell.base_lr * run.cell.batch_size / 256, "weight_decay": o.weight_decay},
              {"params": list(model.classifier.parameters()),
               "base_lr": run.cell.classifier_lr * run.cell.batch_size / 256, "weight_decay": 0.0}]
    return LARS(groups, lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay, eta=o.eta, clip_lr=o.clip_lr,
                exclude_bias_n_norm=o.exclude_bias_n_norm)


def _distributed(model: SSLModel, device: torch.device) -> nn.Module:
    """DDP under torchrun; BatchNorm synchronized across GPUs (PyTorch's SyncBatchNorm is GPU-only, so
    CPU ranks, used for testing, normalize per rank)."""
    if world_size() == 1:
        return model
    if device.type != "cuda":
        return nn.parallel.DistributedDataParallel(model)
    return nn.parallel.DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(model), device_ids=[device.index])


def _train_epoch(trained: nn.Module, model: SSLModel, loader, optimizer: LARS, run: Run, epoch: int,
                 steps_per_epoch: int, stats: tuple[Tensor, Tensor], device: torch.device) -> dict:
    loss_fn = LOSSES[run.method](run.cell)
    mi_weight = run.cell.mi_weight if run.variant.mi_reg else 0.0
    views = (run.view(run.augmentation.view_a), run.view(run.augmentation.view_b))
    generator = torch.Generator(device).manual_seed(run.seed * 100_003 + epoch)  # per-sample draws, per epoch
    channels_last = run.training.channels_last and device.type == "cuda"  # on CPUs oneDNN can abort (tiny shapes)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    total_steps, warmup_steps = run.cell.epochs * steps_per_epoch, run.cell.warmup_epochs * steps_per_epoch
    sums: dict[str, float] = {}
    model.train()
    start, seen = time.perf_counter(), 0
    with progress(f"epoch {epoch + 1}/{run.cell.epochs}", steps_per_epoch, "steps") as advance:
        for step, (x_a, x_b, y) in enumerate(loader):
            global_step = epoch * steps_per_epoch + step
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(global_step, total_steps, warmup_steps, group["base_lr"],
                                            run.optimizer.warmup_start_lr)
            x_a, x_b = (augment(x, view, *stats, generator).contiguous(memory_format=memory_format)
                        for x, view in zip((x_a, x_b), views))
            with _autocast(run.training, device):
                logged = _step(trained, loss_fn, x_a, x_b, y, mi_weight, run.cell.renyi_alpha)
            if not math.isfinite(logged["ssl_loss"]):
                raise UserError(f"non-finite loss at epoch {epoch + 1}, step {step + 1}: stopping; the last "
                                "good checkpoint is kept (lower the learning rate or check the data)")
            optimizer.zero_grad(set_to_none=True)
            logged.pop("loss").backward()
            optimizer.step()
            for key, value in logged.items():
                sums[key] = sums.get(key, 0.0) + value
            seen += len(y) * world_size()
            advance(1, f"loss {logged['ssl_loss']:.4f}  {seen / (time.perf_counter() - start):.0f} images/s")
    row = {"epoch": epoch + 1} | {key: value / steps_per_epoch for key, value in sums.items()}
    row["lower_bound"] = row["mi_z1_r"] - row["mi_z1_z2"]
    row["upper_bound"] = row["entropy_z1"] - row["mi_z1_z2"]
    row["lr"] = optimizer.param_groups[0]["lr"]
    row["images_per_s"] = seen / (time.perf_counter() - start)
    return row


def _step(trained: nn.Module, loss_fn, x_a: Tensor, x_b: Tensor, y: Tensor, mi_weight: float, alpha: int) -> dict:
    """One forward pass; returns the total loss (with graph) and the logged values (floats)."""
    h_a, h_b, z_a, z_b, logits = trained(x_a, x_b)
    ssl = loss_fn(z_a, z_b)
    h, z = torch.cat([h_a, h_b]), torch.cat([z_a, z_b])
    with nullcontext() if mi_weight else torch.no_grad():
        mi = matrix_mutual_info(h, z, alpha)
    targets = torch.cat([y, y])
    loss = ssl + mi_weight * mi + F.cross_entropy(logits, targets)
    with torch.no_grad():
        mi_z1_r = -loss_fn(h_a.detach().float(), h_b.detach().float())
        entropy = renyi_entropy(gram(h.detach()), alpha)
    return {"loss": loss, "ssl_loss": ssl.item(), "mi_z1_z2": mi.item(), "mi_z1_r": mi_z1_r.item(),
            "entropy_z1": entropy.item(), "online_train_acc": (logits.argmax(1) == targets).float().mean().item()}


@torch.no_grad()
def evaluate(model: SSLModel, batches, training: TrainingParams, stats: tuple[Tensor, Tensor],
             device: torch.device) -> float:
    """Top-1 accuracy of the online classifier over `batches` (an eval loader: every image once)."""
    model.eval()
    correct = total = 0
    for x, y in batches:
        x = (x.float() / 255 - stats[0].view(1, 3, 1, 1)) / stats[1].view(1, 3, 1, 1)
        with _autocast(training, device):
            logits = model.classifier(model.backbone(x))
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
    model.train()
    return correct / total


def _autocast(training: TrainingParams, device: torch.device):
    if device.type != "cuda" or training.precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if training.precision == "bf16" else torch.float16)


def _resume(path: Path, run: Run, model: SSLModel, optimizer: LARS) -> tuple[int, list[dict]]:
    if not path.exists():
        return 0, []
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["config"] != run.config():
        log.warning("%s was written for other params: starting over", path)
        return 0, []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming from %s after epoch %d", path, state["epoch"])
    return state["epoch"], state["history"]


def _save(out: Path, model: SSLModel, optimizer: LARS, run: Run, history: list[dict], code_version: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "checkpoint.pt") as staging:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": history[-1]["epoch"],
                    "history": history, "config": run.config(), "code_version": code_version}, staging)
    _write_log(out, history)


def _write_log(out: Path, history: list[dict]) -> None:
    with atomic_file(out / "log.csv") as staging:
        lines = [",".join(COLUMNS)] + [",".join(f"{row[c]:.6g}" for c in COLUMNS) for row in history]
        staging.write_text("\n".join(lines) + "\n")
