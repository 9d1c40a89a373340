"""What a prepared dataset is once loaded: class names and two indexable splits of (image, label)."""

from dataclasses import dataclass
from typing import Protocol

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
