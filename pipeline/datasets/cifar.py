"""CIFAR-10/100 from the official *binary* archives (docs/method.md section 5): nothing is unpickled.

A record is `label_bytes` label bytes then 3,072 pixel bytes: the red, green and blue 32x32 planes,
each row-major.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_dir
from pipeline.datasets.archive import extract_members
from pipeline.datasets.download import download
from pipeline.datasets.splits import ArraySplit, Labeled
from pipeline.errors import UserError
from pipeline.params import Params

PIXEL_BYTES = 3 * 32 * 32
MAX_RECORDS_PER_FILE = 50_000
MAX_TEXT_BYTES = 1 << 20


@dataclass(frozen=True)
class RecordLayout:
    train: tuple[str, ...]  # record files, in order
    test: str
    names: str  # one class name per line
    label_bytes: int = 1
    label_index: int = 0  # CIFAR-100: byte 0 is the coarse label, byte 1 the fine one (used)
    folder: str = ""  # the top folder inside the official archive

    @property
    def record_bytes(self) -> int:
        return self.label_bytes + PIXEL_BYTES

    def max_sizes(self) -> dict[str, int]:
        """Archive member path -> largest size we accept."""
        sizes = {name: MAX_RECORDS_PER_FILE * self.record_bytes for name in (*self.train, self.test)}
        sizes[self.names] = MAX_TEXT_BYTES
        return {f"{self.folder}/{name}": size for name, size in sizes.items()}


CIFAR10 = RecordLayout(
    tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test_batch.bin",
    "batches.meta.txt",
    folder="cifar-10-batches-bin",
)
CIFAR100 = RecordLayout(
    ("train.bin",), "test.bin", "fine_label_names.txt", label_bytes=2, label_index=1, folder="cifar-100-binary"
)


def read_records(path: Path, layout: RecordLayout) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 32, 32, 3) uint8 in file order and their labels (n,) int64."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % layout.record_bytes:
        raise UserError(f"{path}: {raw.size} bytes is not a whole number of {layout.record_bytes}-byte records")
    raw = raw.reshape(-1, layout.record_bytes)
    images = raw[:, layout.label_bytes :].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes -> HWC
    return np.ascontiguousarray(images), raw[:, layout.label_index].astype(np.int64)


def load_records(raw: Path, layout: RecordLayout) -> Labeled:
    if missing := [name for name in (layout.names, *layout.train, layout.test) if not (raw / name).is_file()]:
        raise UserError(f"{raw}: {', '.join(missing)} not found; is it the folder `prepare` wrote?")
    classes = [line.strip() for line in (raw / layout.names).read_text().splitlines() if line.strip()]
    train = [read_records(raw / name, layout) for name in layout.train]
    test = read_records(raw / layout.test, layout)
    return Labeled(
        classes,
        ArraySplit(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        ArraySplit(*test),
    )


def prepare_archive(layout: RecordLayout, name: str, params: Params, out: Path, downloads: Path) -> None:
    """Download, verify and extract the official archive of dataset `name` into `out`."""
    archive, key = getattr(params.datasets, name), f"datasets.{name}"
    path = download(
        archive.url,
        downloads / f"{name}.tar.gz",
        archive.md5,
        retries=params.download.retries,
        timeout_s=params.download.timeout_s,
        md5_key=f"{key}.md5",
    )
    with atomic_dir(out) as staging:
        extract_members(path, layout.max_sizes(), staging, archive.member_md5, f"{key}.member_md5")
        load_records(staging, layout)  # refuse record files that do not parse
