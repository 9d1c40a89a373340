"""Write a dataset split to an FFCV `.beton` file, and describe what was written."""

import functools
import logging
import os
import queue
import time
from collections.abc import Callable
from multiprocessing import Process, Queue, Value
from pathlib import Path

import numpy as np
import pipeline._ffcv  # noqa: F401  (first: FFCV's fast import)
from ffcv.fields import IntField, RGBImageField
from ffcv.memory_allocator import MemoryAllocator
from ffcv.writer import DatasetWriter

from pipeline.atomic import atomic_dir
from pipeline.datasets import get_dataset
from pipeline.datasets.download import file_digest
from pipeline.datasets.splits import Labeled, Split
from pipeline.errors import UserError
from pipeline.params import Params
from pipeline.progress import progress

log = logging.getLogger(__name__)


def convert_dataset(name: str, params: Params, raw: Path, out: Path) -> dict:
    """Write `out/train.beton` and `out/test.beton` from the prepared folder `raw`; return the metadata."""
    spec = get_dataset(name)
    data, storage = spec.load(raw), spec.storage(params)
    with atomic_dir(out) as staging:
        for split_name in ("train", "test"):
            split = getattr(data, split_name)
            rate = write_beton(split, staging / f"{split_name}.beton", storage)
            log.info("%s %s: %d images written, %.0f images/s", name, split_name, len(split), rate)
    return describe(name, data, raw, storage)


def write_beton(split: Split, path: Path, storage: dict, workers: int | None = None) -> float:
    """Write `split` as fields `image` (RGBImageField(**storage)) and `label`; return images/s."""
    workers = workers or min(os.cpu_count() or 1, max(1, len(split) // 1000))
    writer = _CheckedWriter(str(path), {"image": RGBImageField(**storage), "label": IntField()}, num_workers=workers)
    writer.description = f"write {path.name}"
    start = time.perf_counter()
    writer.from_indexed_dataset(split, chunksize=max(1, min(1000, len(split) // (4 * workers))))
    return len(split) / (time.perf_counter() - start)


class _CheckedWriter(DatasetWriter):
    """FFCV 1.0.2's writer with our progress display, and an error instead of a hang when a worker fails.

    `_write_common` follows `ffcv.writer.DatasetWriter._write_common`; FFCV's version waits forever
    for the samples of a worker that died (e.g. on an unreadable image).
    """

    description = "write"

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        self.num_samples = num_samples
        self.prepare()
        work, allocations, errors = Queue(), Queue(), Queue()
        for todo in queue_content:
            work.put(todo)
        for _ in range(self.num_workers):
            work.put(None)
        done = Value("Q", 0)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations,
                *extra_worker_args)
        workers = [Process(target=functools.partial(_report_errors, work_fn, errors), args=args)
                   for _ in range(self.num_workers)]
        try:
            for p in workers:
                p.start()
            self._wait(workers, done, errors)
            allocation_list = [a for _ in workers for a in allocations.get()]
            self.finalize(allocation_list)
        finally:
            for p in workers:
                p.terminate()
                p.join()
            self.metadata_sm.close()
            self.metadata_sm.unlink()

    def _wait(self, workers: list[Process], done, errors: Queue) -> None:
        previous = 0
        with progress(self.description, self.num_samples, "images") as advance:
            while previous < self.num_samples:
                if failed := [p.exitcode for p in workers if p.exitcode not in (None, 0)]:
                    try:
                        reason = errors.get(timeout=5)
                    except queue.Empty:
                        reason = f"a worker process exited with code {failed[0]}"
                    raise UserError(f"writing {self.fname} failed: {reason}")
                current = done.value
                advance(current - previous)
                previous = current
                time.sleep(0.05)


def _report_errors(work_fn: Callable, errors: Queue, *args) -> None:
    """Run an FFCV worker; on failure put its message where the parent process reads it."""
    try:
        work_fn(*args)
    except Exception as e:  # crosses a process boundary: any failure must reach the parent as text
        errors.put(str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
        raise SystemExit(1) from None


def describe(name: str, data: Labeled, raw: Path, storage: dict) -> dict:
    """The metadata JSON of a converted dataset: counts, shape, pixel statistics, source checksums."""
    meta = {"dataset": name, "classes": data.classes, "num_classes": len(data.classes), "storage": storage,
            "sources_sha256": {p.name: file_digest(p, "sha256") for p in sorted(raw.iterdir()) if p.is_file()}}
    for split_name, split in (("train", data.train), ("test", data.test)):
        meta[split_name] = {"count": len(split),
                            "per_class": np.bincount(split.labels, minlength=len(data.classes)).tolist()}
    images = getattr(data.train, "images", None)  # only in-memory datasets have fixed-size images at hand
    meta["image_shape"] = list(images.shape[1:]) if images is not None else None
    meta["mean"], meta["std"] = channel_stats(images) if images is not None else (None, None)
    return meta


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (n, H, W, 3) uint8 images scaled to [0, 1], in bounded memory."""
    total, squares = np.zeros(3), np.zeros(3)
    for chunk in np.array_split(images, max(1, len(images) // 4096)):
        x = chunk.reshape(-1, 3) / 255.0
        total += x.sum(0)
        squares += (x * x).sum(0)
    count = images.size / 3
    mean = total / count
    return mean.round(4).tolist(), np.sqrt(squares / count - mean**2).round(4).tolist()
