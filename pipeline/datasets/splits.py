"""What a prepared dataset is once loaded: class names and two indexable splits of (image, label)."""

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from pipeline.errors import UserError


class Split(Protocol):
    labels: np.ndarray  # (n,) int64

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]: ...  # (H, W, 3) uint8, label


@dataclass(frozen=True)
class Labeled:
    classes: list[str]
    train: Split
    test: Split

    def __post_init__(self) -> None:
        for name, split in (("train", self.train), ("test", self.test)):
            if len(split) == 0:
                raise UserError(f"the {name} split is empty")
            if split.labels.min() < 0 or split.labels.max() >= len(self.classes):
                raise UserError(f"the {name} split has labels outside 0..{len(self.classes) - 1}")


class ArraySplit:
    """Images held in memory as one (n, H, W, 3) uint8 array."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        assert images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8, images.shape
        assert len(images) == len(labels), (len(images), len(labels))
        self.images, self.labels = images, labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


class ImageSummary(NamedTuple):
    """What `convert` records about a dataset's images: their one shape (H, W, 3) and the train split's
    per-channel mean and std in [0, 1]; None where images vary in size."""

    shape: list[int] | None
    mean: list[float] | None
    std: list[float] | None


class ChannelMoments:
    """Running per-channel mean and std of uint8 RGB pixels scaled to [0, 1]."""

    def __init__(self) -> None:
        self.total, self.squares, self.count = np.zeros(3), np.zeros(3), 0

    def add(self, pixels: np.ndarray) -> None:
        """Add (..., 3) uint8 pixels (an image or a batch)."""
        x = pixels.reshape(-1, 3) / 255.0
        self.total += x.sum(0)
        self.squares += (x * x).sum(0)
        self.count += len(x)

    def result(self) -> tuple[list[float], list[float]]:
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.squares / self.count - mean**2, 0))
        return mean.round(4).tolist(), std.round(4).tolist()
