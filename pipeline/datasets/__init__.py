"""The dataset registry: one entry per params/DVC name, saying how to prepare, load and store it."""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import get_args

from pipeline.datasets.cifar import CIFAR10, CIFAR100, RecordLayout, load_records, prepare_archive
from pipeline.datasets.image_tree import load_tree, prepare_tree, tree_problem
from pipeline.datasets.splits import Labeled
from pipeline.datasets.synthetic import load_synthetic, prepare_synthetic
from pipeline.errors import UserError
from pipeline.params import DatasetName, Params

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]  # per-channel mean, std
CIFAR10_STATS: Stats = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS: Stats = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS: Stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RAW = {"write_mode": "raw"}


@dataclass(frozen=True)
class DatasetSpec:
    crop_size: int | None  # training resolution, pixels (docs/method.md section 4); None: the stored images' side
    stem: str  # ResNet stem: "cifar" for 32-px data; "imagenet": variable-size images cropped by the decoder
    stats: Stats | None  # normalization (docs/method.md section 4); None: measured on the train split
    prepare: Callable[[Params, Path, Path | None], None]  # (params, raw folder to write, downloads folder)
    load: Callable[[Path], Labeled]  # raw folder -> classes and splits
    storage: Callable[[Params], dict]  # ffcv RGBImageField arguments
    downloads: bool = False  # `prepare` caches an archive in the downloads folder
    problem: Callable[[Params], str | None] = lambda params: None  # why `prepare` would stop (None: it would not)


def _jpeg(name: str, params: Params) -> dict:
    tree = getattr(params.datasets, name)
    mode = getattr(tree, "write_mode", "jpg")
    return {"write_mode": mode, "jpeg_quality": tree.jpeg_quality, "max_resolution": tree.max_resolution}


def _cifar(name: str, layout: RecordLayout, stats: Stats) -> DatasetSpec:
    """An official CIFAR binary archive: downloaded, 32-px images stored raw."""
    prepare, load = partial(prepare_archive, layout, name), partial(load_records, layout=layout)
    return DatasetSpec(32, "cifar", stats, prepare, load, lambda _: RAW, downloads=True)


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": _cifar("cifar10", CIFAR10, CIFAR10_STATS),
    "cifar100": _cifar("cifar100", CIFAR100, CIFAR100_STATS),
    "imagenet100": DatasetSpec(
        224,
        "imagenet",
        IMAGENET_STATS,
        lambda params, out, _: prepare_tree("imagenet100", params, out),
        load_tree,
        partial(_jpeg, "imagenet100"),
        problem=partial(tree_problem, "imagenet100"),
    ),
    "synthetic": DatasetSpec(
        None, "cifar", None, lambda params, out, _: prepare_synthetic(params, out), load_synthetic, lambda params: RAW
    ),
    "folder": DatasetSpec(
        32,
        "cifar",
        IMAGENET_STATS,
        lambda params, out, _: prepare_tree("folder", params, out),
        load_tree,
        partial(_jpeg, "folder"),
        problem=partial(tree_problem, "folder"),
    ),
}
assert set(DATASETS) == set(get_args(DatasetName)), "registry keys must equal the params names"


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


def unpreparable(params: Params) -> list[str]:
    """Why datasets of `experiment` cannot be prepared as configured (an image tree not set, or not there)."""
    return [
        f"{name} cannot be prepared as configured: {problem}"
        for name in params.experiment.datasets
        if (problem := DATASETS[name].problem(params))
    ]
