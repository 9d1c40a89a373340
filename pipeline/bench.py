"""Side-by-side speed measurements on one machine, same data: loading, training step, regularizer.

(a) two-view training batches/s: our path (FFCV decode + per-sample augmentation on the device)
    against the reference path (a torch Dataset of PIL images with torchvision transforms in a
    multi-worker DataLoader, as solo-learn does);
(b) pretraining images/s for a model size; (c) the MI regularizer's share of the step time.
"""

import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from pipeline.augment import augment
from pipeline.datasets.splits import Split
from pipeline.harness import Trainer, seconds_per_call, synchronize
from pipeline.loaders import ssl_loader
from pipeline.mutual_info import matrix_mutual_info
from pipeline.params import ViewParams
from pipeline.run import Run


def batches_per_second(batches: Iterator, count: int, warmup: int) -> float:
    for _ in islice(batches, warmup):
        pass
    start = time.perf_counter()
    for _ in islice(batches, count):
        pass
    return count / (time.perf_counter() - start)


def our_batches(run: Run, beton: Path, batch_size: int, workers: int, device: torch.device) -> Iterator:
    views, stats = run.views(), run.stats(device)
    loader = ssl_loader(
        beton,
        batch_size,
        seed=0,
        workers=workers,
        device=device,
        crop_size=run.decoder_crop,
        crop_scales=[view.crop_scale for view in views],
    )
    generator = torch.Generator(device).manual_seed(0)
    while True:
        for x_a, x_b, y in loader:
            yield [augment(x, view, *stats, generator) for x, view in zip((x_a, x_b), views)], y
            synchronize(device)


class _Blur:
    """solo-learn's GaussianBlur: PIL's filter with σ uniform in [low, high]."""

    def __init__(self, sigma: list[float]):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(self.sigma[0], self.sigma[1])))


def reference_transform(view: ViewParams, size: int, mean, std) -> Callable:
    mode = T.InterpolationMode.BICUBIC if view.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=tuple(view.crop_scale), ratio=tuple(view.crop_ratio), interpolation=mode),
            T.RandomApply([T.ColorJitter(*view.jitter)], p=view.jitter_p),
            T.RandomGrayscale(p=view.grayscale_p),
            T.RandomApply([_Blur(view.blur_sigma)], p=view.blur_p),
            T.RandomApply([T.RandomSolarize(128, p=1.0)], p=view.solarize_p),
            T.RandomHorizontalFlip(p=view.flip_p),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class _TwoViews(Dataset):
    def __init__(self, split: Split, transforms: tuple[Callable, Callable]):
        self.split, self.transforms = split, transforms

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        image, label = self.split[i]
        pil = Image.fromarray(image)
        return [t(pil) for t in self.transforms], label


def reference_batches(run: Run, split: Split, batch_size: int, workers: int) -> Iterator:
    transforms = (
        reference_transform(run.augmentation.view_a, run.crop_size, run.mean, run.std),
        reference_transform(run.augmentation.view_b, run.crop_size, run.mean, run.std),
    )
    loader = DataLoader(
        _TwoViews(split, transforms),
        batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    while True:
        yield from loader


def step_seconds(run: Run, batch_size: int, steps: int, device: torch.device) -> float:
    """Seconds per training step (pipeline.step: both views, losses, logged values, LARS) on random views
    (loading and augmentation are timed in (a))."""
    trainer = Trainer(run, device)
    x = torch.randn(2, batch_size, 3, run.crop_size, run.crop_size, device=device)
    y = torch.randint(0, run.num_classes, (batch_size,), device=device)
    return seconds_per_call(lambda: trainer.step_on_views(x[0], x[1], y), steps, device)


def regularizer_seconds(run: Run, batch_size: int, repeats: int, device: torch.device) -> float:
    """Seconds for the MI regularizer's forward and backward on features of one step's shapes."""
    feature_dim = 8 * run.common.backbone_width
    out_dim = run.common.projector_out_dim
    h = torch.randn(2 * batch_size, feature_dim, device=device, requires_grad=True)
    z = torch.randn(2 * batch_size, out_dim, device=device, requires_grad=True)
    return seconds_per_call(lambda: matrix_mutual_info(h, z, run.common.renyi_alpha).backward(), repeats, device)
