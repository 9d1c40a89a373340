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
    """Per-channel mean and std of uint8 RGB pixels scaled to [0, 1], from exact per-channel histograms of
    the 256 values: memory bounded by CHUNK pixels whatever the size of the images added, and a result
    that does not depend on the order of the images (the float64 arithmetic starts from exact counts)."""

    CHUNK = 1 << 20  # pixels counted at once: (CHUNK, 3) int64 bin indices, 24 MiB
    _BINS = np.arange(3) * 256  # channel c's value v counts in bin 256 c + v

    def __init__(self) -> None:
        self.counts = np.zeros((3, 256), np.int64)  # (channel, value)

    def add(self, pixels: np.ndarray) -> None:
        """Add (..., 3) uint8 pixels (an image or a batch)."""
        assert pixels.dtype == np.uint8 and pixels.shape[-1] == 3, (pixels.dtype, pixels.shape)
        flat = pixels.reshape(-1, 3)
        for start in range(0, len(flat), self.CHUNK):  # one (chunk, 3) int64 temporary at a time
            bins = np.bincount((flat[start : start + self.CHUNK] + self._BINS).ravel(), minlength=3 * 256)
            self.counts += bins.reshape(3, 256)

    def result(self) -> tuple[list[float], list[float]]:
        """Mean and std (population, as numpy's default) per channel, rounded to 4 decimals."""
        values = np.arange(256) / 255.0
        count = self.counts.sum(1)
        mean = self.counts @ values / count
        variance = (self.counts * (values - mean[:, None]) ** 2).sum(1) / count  # two-pass: no cancellation
        return mean.round(4).tolist(), np.sqrt(variance).round(4).tolist()
