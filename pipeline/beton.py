"""Write a dataset split to an FFCV `.beton` file, and describe what was written."""

import pipeline._ffcv  # noqa: F401  (before any FFCV import: FFCV's fast import)

# isort: split
import functools
import logging
import os
import queue
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import Process, Queue, Value, shared_memory
from pathlib import Path

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.memory_allocator import MemoryAllocator
from ffcv.writer import DatasetWriter

from pipeline.atomic import NO_ROOM, atomic_dir
from pipeline.datasets import get_dataset
from pipeline.datasets.download import file_digest
from pipeline.datasets.image_tree import FileSplit, survey_tree
from pipeline.datasets.splits import ArraySplit, ChannelMoments, ImageSummary, Labeled, Split
from pipeline.errors import UserError
from pipeline.params import Params
from pipeline.progress import progress

log = logging.getLogger(__name__)
SHM = Path("/dev/shm")  # where Linux keeps POSIX shared memory
SHM_PREFIX = "projector_ib_beton_"  # + "<pid>_<random>": the writer's metadata segment


def convert_dataset(name: str, params: Params, raw: Path, out: Path) -> dict:
    """Write `out/train.beton` and `out/test.beton` from the prepared folder `raw`; return the metadata.

    Every image is checked before anything is written (see `summarize_images`)."""
    spec = get_dataset(name)
    if not raw.is_dir():
        raise UserError(f"{raw}: no such folder; pass the folder that `prepare --dataset {name}` wrote")
    data, storage = spec.load(raw), spec.storage(params)
    summary = summarize_images(data, f"datasets.{name}", one_size=spec.stem == "cifar")
    remove_orphan_segments()
    with atomic_dir(out) as staging:
        for split_name in ("train", "test"):
            split = getattr(data, split_name)
            rate = write_beton(split, staging / f"{split_name}.beton", storage)
            log.info("%s %s: %d images written, %.0f images/s", name, split_name, len(split), rate)
    return describe(name, data, raw, storage, summary)


def summarize_images(data: Labeled, key: str, one_size: bool) -> ImageSummary:
    """Shape, mean and std of the images; image trees are opened file by file and bad files refused.

    `one_size`: the dataset's loader decodes images as stored (the "cifar" stem), so all must have one
    size; otherwise (the "imagenet" stem: decoder crops) sizes vary and nothing is summarized."""
    if isinstance(data.train, ArraySplit):  # records: one size by construction
        return ImageSummary(list(data.train.images.shape[1:]), *channel_stats(data.train.images))
    assert isinstance(data.train, FileSplit), type(data.train)
    return survey_tree(data, key, one_size)


def write_beton(split: Split, path: Path, storage: dict, workers: int | None = None) -> float:
    """Write `split` as fields `image` (RGBImageField(**storage)) and `label`; return images/s."""
    workers = workers or min(os.cpu_count() or 1, max(1, len(split) // 1000))
    writer = _CheckedWriter(str(path), {"image": RGBImageField(**storage), "label": IntField()}, num_workers=workers)
    writer.description = f"write {path.name}"
    start = time.perf_counter()
    writer.from_indexed_dataset(split, chunksize=max(1, min(1000, len(split) // (4 * workers))))
    return len(split) / (time.perf_counter() - start)


class _CheckedWriter(DatasetWriter):
    """FFCV 1.0.2's writer with our progress display, an error instead of a hang when a worker fails, and
    cleanup on every exit (error, Ctrl-C): workers stopped, the metadata segment unlinked.

    `_write_common` follows `ffcv.writer.DatasetWriter._write_common`; FFCV's version waits forever
    for the samples of a worker that died (e.g. on an unreadable image).
    """

    description = "write"

    def prepare(self):
        """FFCV's, with the metadata segment renamed `SHM_PREFIX<pid>_<random>` (FFCV names it at random),
        so that `remove_orphan_segments` can recognize one left behind by a killed process. (A SIGKILL in
        the instant between FFCV's segment and ours would leave FFCV's: an unlikely, small leak.)"""
        super().prepare()
        anonymous: shared_memory.SharedMemory = self.metadata_sm  # type: ignore[has-type]
        self.metadata_sm = shared_memory.SharedMemory(
            f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(4)}", create=True, size=anonymous.size
        )
        anonymous.close()
        anonymous.unlink()

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        self.num_samples = num_samples
        with _deferred_ctrl_c() as interrupted:
            self.prepare()
            work: Queue = Queue()
            allocations: Queue = Queue()
            errors: Queue = Queue()
            workers: list[Process] = []
            try:
                for todo in queue_content:
                    work.put(todo)
                for _ in range(self.num_workers):
                    work.put(None)
                done = Value("Q", 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                args = (
                    work,
                    self.metadata_sm,
                    self.metadata_type,
                    self.fields,
                    allocator,
                    done,
                    allocations,
                    *extra_worker_args,
                )
                workers = [
                    Process(target=functools.partial(_report_errors, work_fn, errors), args=args)
                    for _ in range(self.num_workers)
                ]
                for p in workers:
                    p.start()
                self.finalize(self._wait(workers, done, allocations, errors, interrupted))
            finally:
                for p in workers:
                    if p.pid is not None:  # started
                        p.terminate()
                        p.join()
                work.cancel_join_thread()  # else exit waits for the unread work to reach dead workers: a hang
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    def _wait(
        self, workers: list[Process], done, allocations: Queue, errors: Queue, interrupted: Callable[[], bool]
    ) -> list:
        """Show progress until every worker has sent its allocations (the last thing it does, after writing
        its last page), and return them; stop on Ctrl-C, and as soon as a worker fails. FFCV read the
        allocations only once every image was done: a worker that then failed writing its last page (a full
        disk) left it waiting for them forever (issue 20)."""
        previous, sent = 0, list[list]()
        with progress(self.description, self.num_samples, "images") as advance:
            while len(sent) < len(workers):
                if interrupted():
                    raise KeyboardInterrupt
                if failed := [p.exitcode for p in workers if p.exitcode not in (None, 0)]:
                    raise self._failure(errors, failed[0])
                try:
                    sent.append(allocations.get(timeout=0.05))
                except queue.Empty:
                    pass
                current = done.value
                advance(current - previous)
                previous = current
        return [allocation for worker in sent for allocation in worker]

    def _failure(self, errors: Queue, exitcode: int) -> Exception:
        """The error of a failed worker: an OSError naming the file when the write found no room (see
        `pipeline.atomic`), else a UserError with the worker's message."""
        try:
            code, reason = errors.get(timeout=5)
        except queue.Empty:
            code, reason = None, f"a worker process exited with code {exitcode}"
        if code in NO_ROOM:
            return OSError(code, os.strerror(code), self.fname)
        return UserError(f"writing {self.fname} failed: {reason}")


@contextmanager
def _deferred_ctrl_c() -> Iterator[Callable[[], bool]]:
    """Yield `interrupted()`: while the writer runs, Ctrl-C only sets a flag, which `_wait` turns into
    KeyboardInterrupt. Raised where the signal lands, the exception is lost when that is inside a fork
    (Python ignores exceptions in at-fork callbacks): the conversion then went on as if nothing happened."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield lambda: False
        return
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:  # pressed after the last check: the split is written, but the user asked to stop
        raise KeyboardInterrupt


def _report_errors(work_fn: Callable, errors: Queue, *args) -> None:
    """Run an FFCV worker; on failure put its message where the parent process reads it. Ctrl-C is the
    parent's to handle: it stops the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        work_fn(*args)
    except Exception as e:  # crosses a process boundary: any failure must reach the parent, as errno and text
        errors.put((getattr(e, "errno", None), str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from None


def remove_orphan_segments() -> None:
    """Unlink the metadata segments of writers whose process is gone: killed (SIGKILL), it ran no cleanup."""
    for segment in SHM.glob(f"{SHM_PREFIX}*"):
        pid = segment.name.removeprefix(SHM_PREFIX).split("_")[0]
        if pid.isdigit() and not _alive(int(pid)):
            segment.unlink(missing_ok=True)
            log.info("removed %s, left in shared memory by a killed conversion", segment)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def describe(name: str, data: Labeled, raw: Path, storage: dict, images: ImageSummary) -> dict:
    """The metadata JSON of a converted dataset: counts, shape, pixel statistics, source checksums.

    `image_shape` is the shape stored (after FFCV's `max_resolution` resize); mean and std are those of
    the source pixels of the train split."""
    meta = {
        "dataset": name,
        "classes": data.classes,
        "num_classes": len(data.classes),
        "storage": storage,
        "sources_sha256": {p.name: file_digest(p, "sha256") for p in sorted(raw.iterdir()) if p.is_file()},
    }
    for split_name, split in (("train", data.train), ("test", data.test)):
        meta[split_name] = {
            "count": len(split),
            "per_class": np.bincount(split.labels, minlength=len(data.classes)).tolist(),
        }
    meta["image_shape"] = _stored_shape(images.shape, storage.get("max_resolution"))
    meta["mean"], meta["std"] = images.mean, images.std
    return meta


def _stored_shape(shape: list[int] | None, max_resolution: int | None) -> list[int] | None:
    """The shape FFCV stores: the longest side scaled down to `max_resolution` (`ffcv.fields.rgb_image.resizer`)."""
    if shape is None or max_resolution is None or max(shape[:2]) <= max_resolution:
        return shape
    ratio = max_resolution / max(shape[:2])
    return [int(ratio * shape[0]), int(ratio * shape[1]), 3]


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (n, H, W, 3) uint8 images scaled to [0, 1], in bounded memory."""
    moments = ChannelMoments()
    moments.add(images)
    return moments.result()
