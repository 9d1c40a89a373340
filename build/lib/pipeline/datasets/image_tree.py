"""Datasets that are folders of image files on the user's disk: ImageNet-100 and any ImageFolder tree.

The tree is `root/train/<class>/<image>` and `root/val/<class>/<image>` (val is the test split).
Preparing one writes a manifest (root, classes, files per split); images are read at conversion.
DVC tracks the manifest, so adding or removing files re-runs conversion; editing an image in place
does not (then run `dvc repro --force prepare@<name>`).
"""

import json
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.atomic import atomic_dir
from pipeline.datasets.splits import Labeled
from pipeline.errors import UserError
from pipeline.params import Params

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
MANIFEST = "manifest.json"
SPLIT_FOLDERS = {"train": "train", "test": "val"}


def imagenet100_classes() -> list[str]:
    """The CMC / solo-learn ImageNet-100 WNIDs, sorted: label i is the i-th WNID."""
    text = resources.files("pipeline.datasets").joinpath("imagenet100_classes.txt").read_text()
    return sorted(text.split())


def scan_tree(root: str | None, classes: list[str] | None, key: str) -> dict:
    """The manifest of the tree at `root` (`key` names its params section in messages).

    `classes=None` takes every folder under `root/train`.
    """
    if root is None:
        raise UserError(f"{key}.root is not set: point it at a folder holding train/ and val/ class folders")
    tree = Path(root).expanduser().resolve()
    absent = [folder for folder in SPLIT_FOLDERS.values() if not (tree / folder).is_dir()]
    if absent:
        raise UserError(f"{key}.root = {root}: no {' or '.join(f'{f}/' for f in absent)} folder there")
    if classes is None:
        classes = sorted(d.name for d in (tree / "train").iterdir() if d.is_dir())
    files, missing = {}, []
    for split, folder in SPLIT_FOLDERS.items():
        files[split] = []
        for label, name in enumerate(classes):
            images = sorted(p for p in (tree / folder / name).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                missing.append(f"{folder}/{name}")
            files[split] += [[str(p.relative_to(tree)), label] for p in images]
    if missing:
        raise UserError(f"{key}.root = {root}: {len(missing)} class folder(s) missing or without images: "
                        + " ".join(missing))
    return {"root": str(tree), "classes": classes, "files": files}


class FileSplit:
    """Images read from disk on demand, converted to RGB."""

    def __init__(self, root: Path, entries: list[list]):
        self.root = root
        self.paths = [path for path, _ in entries]
        self.labels = np.array([label for _, label in entries], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path = self.root / self.paths[i]
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB")), int(self.labels[i])
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{path}: not a readable image ({e})") from None


def prepare_tree(name: str, params: Params, out: Path) -> None:
    classes = imagenet100_classes() if name == "imagenet100" else None
    manifest = scan_tree(getattr(params.datasets, name).root, classes, f"datasets.{name}")
    with atomic_dir(out) as staging:
        (staging / MANIFEST).write_text(json.dumps(manifest))


def load_tree(raw: Path) -> Labeled:
    manifest = json.loads((raw / MANIFEST).read_text())
    root = Path(manifest["root"])
    return Labeled(manifest["classes"], FileSplit(root, manifest["files"]["train"]),
                   FileSplit(root, manifest["files"]["test"]))
