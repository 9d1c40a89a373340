"""What determines one run's numbers: a cell's settings, resolved once from params (stored in its checkpoint)."""

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from pipeline.augment import ViewSpec
from pipeline.datasets import get_dataset
from pipeline.errors import UserError
from pipeline.metrics import DatasetMetrics
from pipeline.params import (
    BASELINE_HEADS,
    UNTRAINED,
    AugmentationParams,
    BarlowTwinsCommon,
    DatasetName,
    MethodName,
    MethodsParams,
    OptimizerParams,
    Params,
    SimclrCommon,
    VariantParams,
)


@dataclass(frozen=True)
class Variant:
    """What a variant switches on (docs/method.md section 1), resolved from its knobs; zero or None is off."""

    name: str
    mi_weight: float  # λ of the MI regularizer
    mi_grad_fp32: bool  # the regularizer's gradient added in fp32 (its own backward pass) under bf16
    levels: int  # L of the quantizer
    sae: tuple[int, int] | None  # (d, k) of the sparse autoencoder
    projector_layers: int  # the projector's shape (pipeline.projectors.build_head)
    projector_hidden_dim: int
    projector_out_dim: int
    projector_batch_norm: bool

    @classmethod
    def from_params(
        cls, name: str, knobs: VariantParams, common: SimclrCommon | BarlowTwinsCommon, method: str
    ) -> "Variant":
        """The variant's switches; the projector's shape is the method's baseline head where its knobs are absent."""
        sae = (knobs.sae_latent_dim, knobs.sae_topk) if knobs.sae_latent_dim and knobs.sae_topk else None
        layers, batch_norm = BASELINE_HEADS[method]
        return cls(
            name,
            knobs.mi_weight or 0.0,
            bool(knobs.mi_grad_fp32),
            knobs.levels or 0,
            sae,
            layers if knobs.projector_layers is None else knobs.projector_layers,
            knobs.projector_hidden_dim or common.projector_hidden_dim,
            knobs.projector_out_dim or common.projector_out_dim,
            batch_norm if knobs.projector_batch_norm is None else knobs.projector_batch_norm,
        )


@dataclass(frozen=True)
class Run:
    """One cell: dataset × method × variant × seed, with everything that changes its numbers."""

    dataset: DatasetName
    method: MethodName
    variant: Variant
    seed: int
    common: SimclrCommon | BarlowTwinsCommon
    augmentation: AugmentationParams
    optimizer: OptimizerParams
    precision: str  # autocast dtype actually used: "bf16" or "fp32"
    stem: str
    crop_size: int
    decoder_crops: bool  # the FFCV decoder makes the random crop (ImageNet); else the device does
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def config(self) -> dict:
        """What a checkpoint must match to be resumed (its number of processes: pipeline.pretrain checks that)."""
        return {
            name: (value.model_dump() if hasattr(value, "model_dump") else value)
            for name, value in self.__dict__.items()
            if name != "variant"
        } | {"variant": self.variant.__dict__}

    @property
    def decoder_crop(self) -> int | None:
        """The crop side the loader's decoder makes, or None when images are decoded as stored."""
        return self.crop_size if self.decoder_crops else None

    @property
    def reduced_precision(self) -> bool:
        return self.precision != "fp32"

    def stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Normalization mean and std, (3,) each."""
        return torch.tensor(self.mean, device=device), torch.tensor(self.std, device=device)

    def views(self) -> tuple[ViewSpec, ViewSpec]:
        a, b = (
            ViewSpec.from_params(view, self.crop_size, crop=not self.decoder_crops)
            for view in (self.augmentation.view_a, self.augmentation.view_b)
        )
        return a, b

    def epoch_seed(self, epoch: int) -> int:
        """Seed of the per-sample augmentation draws and the data order of `epoch` (one process)."""
        return self.seed * 100_003 + epoch

    def augmentation_seed(self, epoch: int, rank: int) -> int:
        """Seed of process `rank`'s per-sample augmentation draws in `epoch`: `epoch_seed` for rank 0 (one process
        draws as it always did), and another stream for each other rank. The offset is an odd multiple of the rank,
        so it differs between ranks in its low 32 bits too, the only ones a CPU generator uses."""
        return self.epoch_seed(epoch) + rank * 0x9E3779B9


def cell_variant(params: Params, dataset: str, method: str, variant: str) -> Variant:
    """The variant of a cell, resolved from params; an unknown dataset, method or variant is refused by name.
    Stages call this before reading any file, so that a wrong name is the error they report first.

    `variant` may be UNTRAINED: the encoder alone, as pretraining starts it (for evaluation)."""
    get_dataset(dataset)
    if method not in MethodsParams.model_fields:
        raise UserError(f"unknown method {method!r}; choose from {', '.join(MethodsParams.model_fields)}")
    cell = getattr(getattr(params.pretrain, dataset), method)
    if variant == UNTRAINED:
        return Variant.from_params(UNTRAINED, VariantParams(), cell.common, method)
    if variant not in cell.variants:
        raise UserError(
            f"unknown variant {variant!r}; pretrain.{dataset}.{method}.variants defines {', '.join(cell.variants)}"
        )
    return Variant.from_params(variant, cell.variants[variant], cell.common, method)


def make_run(
    params: Params, dataset: str, method: str, variant: str, seed: int, meta: DatasetMetrics, device: torch.device
) -> Run:
    """The run of one cell (see `cell_variant`); `meta` is the dataset's conversion metadata (classes, pixel
    statistics)."""
    resolved = cell_variant(params, dataset, method, variant)
    spec = get_dataset(dataset)
    cell = getattr(getattr(params.pretrain, dataset), method)
    if meta.num_classes != len(meta.classes) or meta.num_classes < 2:
        raise UserError(f"the {dataset} metadata has {meta.num_classes} classes for {len(meta.classes)} names")
    mean, std = spec.stats or (tuple(meta.mean or ()), tuple(meta.std or ()))
    if len(mean) != 3 or len(std) != 3:
        raise UserError(f"the {dataset} metadata has no pixel statistics (mean, std) to normalize with")
    return Run(
        dataset=cast(DatasetName, dataset),  # both checked above
        method=cast(MethodName, method),
        variant=resolved,
        seed=seed,
        common=cell.common,
        augmentation=params.augmentations[cell.common.augmentation],
        optimizer=params.optimizer,
        precision=params.training.precision if device.type == "cuda" else "fp32",
        stem=spec.stem,
        crop_size=spec.crop_size or _image_side(dataset, meta),
        decoder_crops=spec.stem == "imagenet",
        num_classes=meta.num_classes,
        mean=mean,
        std=std,
    )


def _image_side(dataset: str, meta: DatasetMetrics) -> int:
    if not meta.image_shape or meta.image_shape[0] != meta.image_shape[1]:
        raise UserError(f"the {dataset} metadata records no square image shape (found {meta.image_shape})")
    return meta.image_shape[0]
