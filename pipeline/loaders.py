"""FFCV loaders: two views of every image for self-supervised training, each image once for evaluation.

Batches are uint8 tensors (N, 3, H, W) on `device` and int64 labels; augmentation and normalization
that run on the device batch come after (see the pretraining code).
"""

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import pipeline._ffcv  # noqa: F401  (first: FFCV's fast import)
from ffcv.fields.decoders import (CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder,
                                  SimpleRGBImageDecoder)
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline import PipelineSpec
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

CENTER_CROP_RATIO = 224 / 256  # eval: resize 256, center crop 224 (PAPER.md section 4.1)


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


def ssl_loader(path: Path, batch_size: int, *, seed: int, crop_scales: Sequence[Sequence[float]], workers: int = -1,
               crop_size: int | None = None, device: torch.device = torch.device("cpu"),
               distributed: bool = False) -> Batches:
    """Shuffled batches of (x_a, x_b, y), or (x, y) with one crop scale: views decoded from the one stored image.

    `crop_size=None` decodes images as stored (fixed-size data such as CIFAR); otherwise each view
    is a random resized crop (area range `crop_scales[view]`) made by the decoder. Augmentation
    proper runs on the device batch (`pipeline.augment`).
    """
    def view(scale: Sequence[float]) -> list:
        decoder = (SimpleRGBImageDecoder() if crop_size is None
                   else RandomResizedCropRGBImageDecoder((crop_size,) * 2, scale=tuple(scale)))
        return [decoder, *_to_torch(device)]

    names = ["image"] + [f"image_{k}" for k in range(1, len(crop_scales))]
    pipelines = {name: view(scale) if name == "image" else PipelineSpec("image", transforms=view(scale))
                 for name, scale in zip(names, crop_scales)}
    loader = Loader(str(path), batch_size, num_workers=workers, order=OrderOption.RANDOM, seed=seed,
                    drop_last=True, distributed=distributed, pipelines=pipelines | {"label": _label_ops(device)})
    return Batches(loader, (*names, "label"))


def eval_loader(path: Path, batch_size: int, *, workers: int = -1, crop_size: int | None = None,
                device: torch.device = torch.device("cpu"), distributed: bool = False) -> Batches:
    """Every image exactly once, in file order, as (x, y); the last batch may be smaller."""
    decoder = (SimpleRGBImageDecoder() if crop_size is None
               else CenterCropRGBImageDecoder((crop_size,) * 2, ratio=CENTER_CROP_RATIO))
    loader = Loader(str(path), batch_size, num_workers=workers, order=OrderOption.SEQUENTIAL, drop_last=False,
                    distributed=distributed,
                    pipelines={"image": [decoder, *_to_torch(device)], "label": _label_ops(device)})
    return Batches(loader, ("image", "label"))


def _to_torch(device: torch.device) -> list:
    move = [ToDevice(device, non_blocking=True)] if device.type != "cpu" else []
    return [ToTensor(), *move, ToTorchImage()]


def _label_ops(device: torch.device) -> list:
    move = [ToDevice(device, non_blocking=True)] if device.type != "cpu" else []
    return [IntDecoder(), ToTensor(), *move, Squeeze(1)]
