"""FFCV loaders: two views of every image for self-supervised training, each image once for evaluation.

Batches are uint8 tensors (N, 3, H, W) on `device` and int64 labels; augmentation and normalization
that run on the device batch come after (see the pretraining code).
"""

import pipeline._ffcv  # noqa: F401  (before any FFCV import: FFCV's fast import)

# isort: split
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numba
import numpy as np
import torch
from ffcv.fields.decoders import (
    CenterCropRGBImageDecoder,
    IntDecoder,
    RandomResizedCropRGBImageDecoder,
    SimpleRGBImageDecoder,
)
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.compiler import Compiler
from ffcv.reader import Reader
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

from pipeline.errors import UserError
from pipeline.runtime import cpu_share

log = logging.getLogger(__name__)

CENTER_CROP_RATIO = 224 / 256  # eval: resize 256, center crop 224 (docs/method.md section 4.1)
# FFCV compiles each loader's decoding pipeline with numba: about 2-3 s per loader on the 2-core machine.
# Decoding in Python instead costs about 30 µs an image and view, so splits smaller than this start and
# finish sooner without compiling (a 1,200-image epoch: 0.07 s against 3 s). Speed only: the bytes are the same.
JIT_MIN_IMAGES = 20_000


FIELDS = ["image", "label"]  # what `pipeline.beton.write_beton` writes


def check_betons(data: Path, num_classes: int, metadata: Path | str = "the metadata") -> None:
    """Refuse, before any training, a data folder whose train.beton or test.beton is missing, is not a
    complete .beton of (image, label), or holds labels outside 0..num_classes-1 (`metadata` says where
    num_classes comes from). Reads the headers and label columns only."""
    for split in ("train", "test"):
        path = data / f"{split}.beton"
        labels = read_labels(path)
        if labels.min() < 0 or labels.max() >= num_classes:
            raise UserError(
                f"{path}: labels range over {labels.min()}..{labels.max()}, but {metadata} has "
                f"num_classes {num_classes}: they come from different conversions; run convert again"
            )


def read_labels(path: Path) -> np.ndarray:
    """The label of every sample of the .beton at `path`; a UserError naming it if it is not a whole one."""
    if not path.is_file():
        raise UserError(f"{path}: no such file; `convert` writes train.beton and test.beton in one folder")
    size = path.stat().st_size
    try:
        header = np.fromfile(path, dtype=HeaderType, count=1)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None
    if len(header) == 0:
        raise UserError(f"{path}: {size} bytes is too short for a .beton file; run convert again")
    version, num_samples, table = (int(header[0][k]) for k in ("version", "num_samples", "alloc_table_ptr"))
    if version != CURRENT_VERSION:
        raise UserError(f"{path}: not an FFCV .beton file (format version {version}, expected {CURRENT_VERSION})")
    if table > size or (size - table) % ALLOC_TABLE_TYPE.itemsize:
        raise UserError(
            f"{path}: truncated or corrupt: {size} bytes, but its header places the allocation table "
            f"at byte {table}; run convert again"
        )
    try:
        reader = Reader(str(path))
    except (ValueError, IndexError, KeyError, AssertionError) as e:
        raise UserError(f"{path}: corrupt .beton header ({type(e).__name__}: {e}); run convert again") from None
    if reader.field_names != FIELDS:
        raise UserError(f"{path}: holds fields {reader.field_names}, expected {FIELDS}")
    if num_samples == 0 or len(reader.metadata) != num_samples or len(reader.alloc_table) != num_samples:
        raise UserError(
            f"{path}: truncated or corrupt: the header counts {num_samples} samples, the file holds "
            f"{len(reader.metadata)} sample records and {len(reader.alloc_table)} images"
        )
    if (reader.alloc_table["ptr"] + reader.alloc_table["size"]).max() > table:
        raise UserError(f"{path}: corrupt: an image lies beyond the data region; run convert again")
    return reader.metadata[f"f{FIELDS.index('label')}"].astype(np.int64)


class Batches:
    """An FFCV loader whose batches come as a tuple of the named outputs, in the order asked for."""

    def __init__(self, loader: Loader, names: Sequence[str]):
        self.loader, self.names = loader, tuple(names)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """The data order of a shuffled loader is a function of (seed, epoch)."""
        self.loader.next_epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order = list(self.loader.pipeline_specs)  # FFCV yields outputs in this order
        for batch in self.loader:
            named = dict(zip(order, batch))
            yield tuple(named[name] for name in self.names)


def ssl_loader(
    path: Path,
    batch_size: int,
    *,
    seed: int,
    crop_scales: Sequence[Sequence[float]],
    workers: int = -1,
    crop_size: int | None = None,
    device: torch.device = torch.device("cpu"),
    distributed: bool = False,
    jit_min_images: int = JIT_MIN_IMAGES,
) -> Batches:
    """Shuffled batches of (x_a, x_b, y), or (x, y) with one crop scale: views decoded from the one stored image.

    `crop_size=None` decodes images as stored (fixed-size data such as CIFAR); otherwise each view
    is a random resized crop (area range `crop_scales[view]`) made by the decoder. Augmentation
    proper runs on the device batch (`pipeline.augment`).
    """

    def view(scale: Sequence[float]) -> list:
        decoder = (
            SimpleRGBImageDecoder()
            if crop_size is None
            else RandomResizedCropRGBImageDecoder((crop_size,) * 2, scale=tuple(scale))
        )
        return [decoder, *_to_torch(device)]

    names = ["image"] + [f"image_{k}" for k in range(1, len(crop_scales))]
    pipelines = {
        name: view(scale) if name == "image" else PipelineSpec("image", transforms=view(scale))
        for name, scale in zip(names, crop_scales)
    }
    loader = _loader(
        path,
        jit_min_images,
        batch_size=batch_size,
        num_workers=workers,
        order=OrderOption.RANDOM,
        seed=seed,
        drop_last=True,
        distributed=distributed,
        pipelines=pipelines | {"label": _label_ops(device)},
    )
    return Batches(loader, (*names, "label"))


def eval_loader(
    path: Path,
    batch_size: int,
    *,
    workers: int = -1,
    crop_size: int | None = None,
    device: torch.device = torch.device("cpu"),
    distributed: bool = False,
    jit_min_images: int = JIT_MIN_IMAGES,
) -> Batches:
    """Every image exactly once, in file order, as (x, y); the last batch may be smaller."""
    decoder = (
        SimpleRGBImageDecoder()
        if crop_size is None
        else CenterCropRGBImageDecoder((crop_size,) * 2, ratio=CENTER_CROP_RATIO)
    )
    loader = _loader(
        path,
        jit_min_images,
        batch_size=batch_size,
        num_workers=workers,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        distributed=distributed,
        pipelines={"image": [decoder, *_to_torch(device)], "label": _label_ops(device)},
    )
    return Batches(loader, ("image", "label"))


def decoding_threads(workers: int) -> int:
    """FFCV's decoding threads for `training.loader_workers`: -1 is this process's share of the CPUs
    (`pipeline.runtime.cpu_share`); a count above the CPUs numba may use here is lowered to them (numba refuses
    more). Speed only: every sample's bytes and random draws are the same whatever the count."""
    limit = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # the CPUs this process may use at import
    threads = min(cpu_share() if workers == -1 else workers, limit)
    if threads < workers:
        log.info("loader_workers %d: this process may use %d CPUs; decoding with %d threads", workers, limit, threads)
    return threads


def _loader(path: Path, jit_min_images: int, num_workers: int, **options) -> Loader:
    """An FFCV Loader with `decoding_threads(num_workers)`, its pipeline compiled only for splits of at least
    `jit_min_images` images."""
    header = np.fromfile(path, dtype=HeaderType, count=1)
    Compiler.set_enabled(len(header) == 0 or int(header[0]["num_samples"]) >= jit_min_images)
    return Loader(str(path), num_workers=decoding_threads(num_workers), **options)


def _to_torch(device: torch.device) -> list:
    move = [ToDevice(device, non_blocking=True)] if device.type != "cpu" else []
    return [ToTensor(), *move, ToTorchImage()]


def _label_ops(device: torch.device) -> list:
    move = [ToDevice(device, non_blocking=True)] if device.type != "cpu" else []
    return [IntDecoder(), ToTensor(), *move, Squeeze(1)]
