"""Datasets that are folders of image files on the user's disk: ImageNet-100 and any ImageFolder tree.

The tree is `root/train/<class>/<image>` and, for the test split, `root/val/<class>/<image>` or
`root/test/<class>/<image>` (exactly one of the two). Preparing one writes a manifest (root, classes, and
per split the files with their label and SHA-256) and `images/`, a symbolic link to every image listed,
at its path under the root; images are read at conversion. DVC hashes the prepared folder through these
links (and keeps the hashes in its state, by file size and modification time), so an image added, removed
or edited in place makes the dataset's stages stale. The prepared folder is not cached by DVC
(`cache: false`): caching would replace the links by copies of the images.
"""

import hashlib
import json
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_dir
from pipeline.datasets.download import file_digest
from pipeline.datasets.image_files import is_16_bit, open_image, read_rgb
from pipeline.datasets.splits import ChannelMoments, ImageSummary, Labeled, Split
from pipeline.errors import UserError
from pipeline.params import Params
from pipeline.progress import progress

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
MANIFEST = "manifest.json"
LINKS = "images"  # the prepared folder's links to the images, by their path under the root
TEST_FOLDERS = ("val", "test")  # the test split's folder: either name
LISTED = 10  # problems listed in a message beyond the first


def imagenet100_classes() -> list[str]:
    """The CMC / solo-learn ImageNet-100 WNIDs, sorted: label i is the i-th WNID."""
    text = resources.files("pipeline.datasets").joinpath("imagenet100_classes.txt").read_text()
    return sorted(text.split())


def scan_tree(
    root: str | None, classes: list[str] | None, key: str, per_class: dict[str, int | None] | None = None
) -> dict:
    """The manifest of the tree at `root` (`key` names its params section in messages).

    `classes=None` takes every folder under `root/train`; a class folder found only in the test split
    is an error. `per_class[split]` (None: all) caps the images kept per class (see `subsample`).
    """
    tree = _tree_root(root, key)
    folders = {"train": "train", "test": _test_folder(tree, root, key)}
    if classes is None:
        classes = _class_folders(tree, folders["test"], root, key)
    files: dict[str, list[list]] = {}
    missing: list[str] = []
    for split, folder in folders.items():
        files[split] = []
        for label, name in enumerate(classes):
            images = sorted(p for p in (tree / folder / name).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                missing.append(f"{folder}/{name}")
            kept = subsample(images, (per_class or {}).get(split))
            files[split] += [[str(p.relative_to(tree)), label] for p in kept]
    if missing:
        raise UserError(
            f"{key}.root = {root}: {len(missing)} class folder(s) missing or without images: " + " ".join(missing)
        )
    return {"root": str(tree), "classes": classes, "files": files}


def subsample(images: list[Path], cap: int | None) -> list[Path]:
    """At most `cap` of `images` (sorted), a fixed pseudo-random choice: the files whose names have the
    smallest SHA-256. The choice depends only on the names, not on the machine or the listing order."""
    if cap is None or len(images) <= cap:
        return images
    return sorted(sorted(images, key=lambda p: hashlib.sha256(p.name.encode()).digest())[:cap])


def tree_problem(name: str, params: Params) -> str | None:
    """What would stop `prepare` before it lists the tree of dataset `name` (its root), or None."""
    try:
        _tree_root(getattr(params.datasets, name).root, f"datasets.{name}")
    except UserError as e:
        return str(e)
    return None


def _tree_root(root: str | None, key: str) -> Path:
    if root is None:
        raise UserError(f"{key}.root is not set: point it at a folder holding train/ and val/ (or test/) class folders")
    tree = Path(root).expanduser().resolve()
    if not tree.is_dir():
        raise UserError(f"{key}.root = {root}: no such folder")
    if not (tree / "train").is_dir():
        raise UserError(f"{key}.root = {root}: no train/ folder there")
    return tree


def _test_folder(tree: Path, root: str | None, key: str) -> str:
    found = [name for name in TEST_FOLDERS if (tree / name).is_dir()]
    if len(found) != 1:
        problem = (
            "both val/ and test/ folders there: keep the one that holds the test split"
            if found
            else "no val/ or test/ folder there (the test split)"
        )
        raise UserError(f"{key}.root = {root}: {problem}")
    return found[0]


def _class_folders(tree: Path, test: str, root: str | None, key: str) -> list[str]:
    """The class folders under train/; refuses class folders that exist only under the test folder."""
    train = sorted(d.name for d in (tree / "train").iterdir() if d.is_dir())
    if only_test := sorted(d.name for d in (tree / test).iterdir() if d.is_dir() and d.name not in train):
        raise UserError(
            f"{key}.root = {root}: {len(only_test)} class folder(s) under {test}/ but not under "
            f"train/: {' '.join(only_test)}; add their training images or remove them"
        )
    return train


class FileSplit:
    """Images read from disk on demand, as (H, W, 3) uint8 RGB."""

    def __init__(self, root: Path, entries: list[list]):
        """`entries`: the manifest's [path under `root`, label, SHA-256] of each image."""
        self.root = root
        self.paths = [entry[0] for entry in entries]
        self.labels = np.array([entry[1] for entry in entries], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return read_rgb(self.path(i)), int(self.labels[i])

    def path(self, i: int) -> Path:
        return self.root / self.paths[i]


def survey_tree(data: Labeled, key: str, one_size: bool) -> ImageSummary:
    """Open every image of both splits before anything is written: refuse unreadable ones, and say which
    are 16-bit. With `one_size` (the loader decodes images as stored, so a batch needs one size), refuse
    images whose size differs from the others', by name and from their headers, before decoding any; then
    decode the train split, one image at a time, for its mean and std."""
    sizes, deep = _read_headers(data)
    if deep:
        log.warning(
            "%d 16-bit image(s), e.g. %s: stored with 8 bits per channel (the high byte of each value)",
            len(deep),
            deep[0],
        )
    if not one_size:
        return ImageSummary(None, None, None)
    _refuse_mixed_sizes(sizes, key)
    ((width, height),) = sizes
    return ImageSummary([height, width, 3], *_train_moments(data.train))


def _read_headers(data: Labeled) -> tuple[dict[tuple[int, int], list[Path]], list[Path]]:
    """The images of both splits by size (width, height), and the 16-bit ones; unreadable ones refused."""
    sizes: dict[tuple[int, int], list[Path]] = defaultdict(list)
    unreadable, deep = [], []
    with progress("check images", len(data.train) + len(data.test), "images") as advance:
        for split in (data.train, data.test):
            assert isinstance(split, FileSplit), type(split)
            for i in range(len(split)):
                try:
                    with open_image(split.path(i)) as image:
                        sizes[image.size].append(split.path(i))
                        if is_16_bit(image):
                            deep.append(split.path(i))
                except UserError as e:
                    unreadable.append(str(e))
                advance(1)
    if unreadable:
        raise UserError(_listed(unreadable, "unreadable images"))
    return sizes, deep


def _train_moments(train: Split) -> tuple[list[float], list[float]]:
    """Mean and std of the train split's pixels, decoded one image at a time; corrupt pixel data refused."""
    assert isinstance(train, FileSplit), type(train)
    moments, unreadable = ChannelMoments(), []
    with progress("measure images", len(train), "images") as advance:
        for i in range(len(train)):
            try:
                moments.add(read_rgb(train.path(i)))
            except UserError as e:
                unreadable.append(str(e))
            advance(1)
    if unreadable:
        raise UserError(_listed(unreadable, "unreadable images"))
    return moments.result()


def _refuse_mixed_sizes(sizes: dict[tuple[int, int], list[Path]], key: str) -> None:
    if len(sizes) < 2:
        return
    common = max(sizes, key=lambda size: len(sizes[size]))
    odd = [f"{path}: {w}x{h} pixels" for (w, h), paths in sizes.items() if (w, h) != common for path in paths]
    odd[0] += (
        f", but {len(sizes[common])} other images are {common[0]}x{common[1]} and {key} images must all "
        "have one size (the loader decodes them as stored): resize it"
    )
    raise UserError(_listed(odd, "images of other sizes"))


def _listed(problems: list[str], what: str) -> str:
    """The first problem on the first line, then up to LISTED more, one a line."""
    if len(problems) == 1:
        return problems[0]
    rest = "\n  ".join(problems[1 : LISTED + 1]) + ("\n  ..." if len(problems) > LISTED + 1 else "")
    return f"{problems[0]} (and {len(problems) - 1} more {what})\n  {rest}"


def prepare_tree(name: str, params: Params, out: Path) -> None:
    tree = getattr(params.datasets, name)
    classes = imagenet100_classes() if name == "imagenet100" else None
    per_class = {"train": getattr(tree, "train_per_class", None), "test": getattr(tree, "test_per_class", None)}
    manifest = scan_tree(tree.root, classes, f"datasets.{name}", per_class)
    root, entries = Path(manifest["root"]), [entry for split in manifest["files"].values() for entry in split]
    digests = image_digests(root, [path for path, _ in entries])
    for entry in entries:
        entry.append(digests[entry[0]])
    with atomic_dir(out) as staging:
        (staging / MANIFEST).write_text(json.dumps(manifest))
        for folder in {Path(path).parent for path, *_ in entries}:
            (staging / LINKS / folder).mkdir(parents=True, exist_ok=True)
        for path, *_ in entries:
            (staging / LINKS / path).symlink_to(root / path)


def image_digests(root: Path, paths: list[str]) -> dict[str, str]:
    """The SHA-256 of each file at `root / path`, read by a few threads at once (hashlib releases the GIL,
    and reads from a slow disk overlap)."""
    with ThreadPoolExecutor(max_workers=8) as pool, progress("digest images", len(paths), "images") as advance:
        digests = {}
        for path, digest in zip(paths, pool.map(lambda p: file_digest(root / p, "sha256"), paths)):
            digests[path] = digest
            advance(1)
    return digests


def load_tree(raw: Path) -> Labeled:
    path = raw / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        root, classes, files = Path(manifest["root"]), manifest["classes"], manifest["files"]
        return Labeled(classes, FileSplit(root, files["train"]), FileSplit(root, files["test"]))
    except FileNotFoundError:
        raise UserError(f"{path}: not found; is {raw} the folder `prepare` wrote?") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"{path}: not a manifest written by `prepare` ({type(e).__name__}: {e}); run prepare again"
        ) from None
