"""Write-then-read round trips through real .beton files and the FFCV loaders."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.beton import SHM, SHM_PREFIX, channel_stats, convert_dataset, write_beton
from pipeline.datasets.cifar import CIFAR10
from pipeline.datasets.image_tree import imagenet100_classes
from pipeline.datasets.splits import ArraySplit
from pipeline.errors import UserError
from pipeline.loaders import eval_loader, ssl_loader
from stages.cli import app
from tests.helpers import REPO, SHARED_DATA, convert_args, make_tree, stage_process, write_params
from tests.test_cifar import IMAGES_SHA256, LABELS_SHA256, needs_genuine


def read_all(path, batch_size=256, **kwargs):
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in eval_loader(path, batch_size, workers=2, **kwargs)])
    return torch.cat(xs).permute(0, 2, 3, 1).contiguous().numpy(), torch.cat(ys).numpy()


@needs_genuine
def test_genuine_test_batch_survives_the_beton(tmp_path, params):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / CIFAR10.test).symlink_to(SHARED_DATA / "test_batch.bin")
    for name in CIFAR10.train:  # a stand-in train split: conversion needs both
        (raw / name).symlink_to(SHARED_DATA / "test_batch.bin")
    (raw / CIFAR10.names).symlink_to(SHARED_DATA / "batches.meta.txt")
    meta = convert_dataset("cifar10", params, raw, tmp_path / "ffcv")
    assert meta["test"]["per_class"] == [1000] * 10 and meta["classes"][:2] == ["airplane", "automobile"]
    images, labels = read_all(tmp_path / "ffcv" / "test.beton")
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    assert hashlib.sha256(images.tobytes()).hexdigest() == IMAGES_SHA256
    assert hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest() == LABELS_SHA256


def test_eval_loader_keeps_every_image_in_order(tmp_path):
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 1000)
    write_beton(ArraySplit(images, labels), tmp_path / "a.beton", {"write_mode": "raw"}, workers=2)
    got_images, got_labels = read_all(tmp_path / "a.beton", batch_size=300)  # 300 does not divide 1000
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize(
    "storage, crop",
    [({"write_mode": "raw"}, None), ({"write_mode": "jpg", "jpeg_quality": 90, "max_resolution": 64}, 24)],
)
def test_compiled_and_python_decoding_give_the_same_batches(tmp_path, storage, crop):
    """Small splits decode in Python (JIT_MIN_IMAGES): the same bytes as FFCV's compiled pipeline."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (150, 40, 40, 3), dtype=np.uint8)
    write_beton(ArraySplit(images, rng.integers(0, 10, 150)), tmp_path / "a.beton", storage, workers=1)
    compiled, python = (read_all(tmp_path / "a.beton", 64, crop_size=crop, jit_min_images=n) for n in (0, 10**9))
    np.testing.assert_array_equal(compiled[0], python[0])
    np.testing.assert_array_equal(compiled[1], python[1])
    views = [
        [
            x.clone()
            for x, _, _ in ssl_loader(
                tmp_path / "a.beton", 32, seed=3, crop_scales=[(0.08, 1.0)] * 2, crop_size=crop, jit_min_images=n
            )
        ]
        for n in (0, 10**9)
    ]
    if crop is None:  # the decoder's random crops draw from numba's generator or numpy's: only the order is common
        torch.testing.assert_close(torch.cat(views[0]), torch.cat(views[1]))


def test_ssl_loader_yields_two_views_of_the_same_images(tmp_path):
    # Each image is constant with value = its index mod 250, so a view identifies its image.
    n = 600
    images = np.broadcast_to((np.arange(n) % 250).astype(np.uint8)[:, None, None, None], (n, 32, 32, 3)).copy()
    write_beton(ArraySplit(images, np.arange(n) % 10), tmp_path / "a.beton", {"write_mode": "raw"}, workers=1)
    batches = ssl_loader(tmp_path / "a.beton", 128, seed=0, crop_scales=[(0.08, 1.0)] * 2, workers=2)
    assert len(batches) == n // 128  # drop_last: every batch is full
    seen = []
    for x_a, x_b, y in batches:
        assert x_a.shape == x_b.shape == (128, 3, 32, 32) and x_a.dtype == torch.uint8 and y.shape == (128,)
        torch.testing.assert_close(x_a, x_b)  # no per-view augmentation configured: identical decodes
        assert torch.equal(x_a[:, 0, 0, 0].long() % 10, y)
        seen.append(x_a[:, 0, 0, 0])
    assert not torch.equal(torch.cat(seen)[:128], torch.arange(128, dtype=torch.uint8))  # shuffled


def test_convert_writes_betons_and_metadata(tmp_path, params):
    rng = np.random.default_rng(2)
    raw = tmp_path / "raw"
    raw.mkdir()
    np.save(raw / "train_images.npy", rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8))
    np.save(raw / "train_labels.npy", np.arange(50) % 3)
    np.save(raw / "test_images.npy", np.full((9, 32, 32, 3), 128, np.uint8))
    np.save(raw / "test_labels.npy", np.array([0, 1, 2] * 3))
    (raw / "classes.txt").write_text("a\nb\nc\n")
    meta = convert_dataset("synthetic", params, raw, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test.beton", "train.beton"]
    assert meta["train"] == {"count": 50, "per_class": [17, 17, 16]} and meta["test"]["per_class"] == [3, 3, 3]
    assert meta["image_shape"] == [32, 32, 3] and meta["classes"] == ["a", "b", "c"]
    assert (
        meta["sources_sha256"]["test_images.npy"] == hashlib.sha256((raw / "test_images.npy").read_bytes()).hexdigest()
    )
    json.dumps(meta)  # serializable as is


def testchannel_stats_match_numpy(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, (5000, 8, 8, 3), dtype=np.uint8)
    mean, std = channel_stats(images)
    np.testing.assert_allclose(mean, (images / 255).mean((0, 1, 2)), atol=1e-4)
    np.testing.assert_allclose(std, (images / 255).std((0, 1, 2)), atol=1e-4)


class Unreadable(ArraySplit):
    """Image 7 (or, with `first`, image 0) cannot be read."""

    def __init__(self, images, labels, first: bool = False):
        super().__init__(images, labels)
        self.bad = 0 if first else 7

    def __getitem__(self, i):
        if i == self.bad:
            raise UserError(f"image {i} is unreadable")
        return super().__getitem__(i)


def test_failing_worker_raises_instead_of_hanging(tmp_path):
    images = np.zeros((40, 32, 32, 3), np.uint8)
    with pytest.raises(UserError, match="writing .*a.beton failed: image 7 is unreadable"):
        write_beton(Unreadable(images, np.zeros(40)), tmp_path / "a.beton", {"write_mode": "raw"}, workers=2)


@pytest.mark.parametrize("module", ["pipeline.loaders", "pipeline.beton"])
def test_modules_that_use_ffcv_import_it_fast(module):
    """In a fresh process, importing a module that uses FFCV imports FFCV through pipeline._ffcv: the image
    modes table is a plain dict (a numba typed Dict compiles for about 3 s) and numba's Dict is restored.
    (An import sorter once moved pipeline._ffcv after the FFCV imports, and nothing else noticed.)"""
    script = (
        f"import {module}, numba.typed\n"
        "from ffcv.fields.rgb_image import IMAGE_MODES\n"
        "assert type(IMAGE_MODES) is dict and IMAGE_MODES == {'jpg': 0, 'raw': 1}, type(IMAGE_MODES)\n"
        "assert numba.typed.Dict is not dict\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_failing_writer_exits_promptly_with_work_left_in_the_queue(tmp_path):
    """Issue 14: with its first image unreadable, a large `convert` named the image, then never exited: the
    work queue the parent had filled still waited, at exit, to be handed to the workers it had stopped."""
    script = (
        f"import numpy as np; from pathlib import Path; from tests.test_beton import Unreadable\n"
        f"from pipeline.beton import write_beton; from pipeline.errors import UserError\n"
        f"try: write_beton(Unreadable(np.zeros((60000, 8, 8, 3), np.uint8), np.zeros(60000), first=True), "
        f"Path({str(tmp_path / 'a.beton')!r}), {{'write_mode': 'raw'}}, workers=2)\n"
        f"except UserError as e: print(e)"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "image 0 is unreadable" in result.stdout, result.stderr


def test_convert_refuses_a_raw_folder_that_does_not_exist(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "convert",
            "--dataset",
            "synthetic",
            "--raw",
            str(tmp_path / "absent"),
            "--out",
            str(tmp_path / "ffcv"),
            "--metadata",
            str(tmp_path / "m.json"),
            "--params",
            str(REPO / "params.yaml"),
        ],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"error: {tmp_path / 'absent'}: no such folder" in result.output
    assert list(tmp_path.iterdir()) == []


needs_shm = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm (POSIX shared memory as files: Linux)")


@pytest.fixture
def slow_conversion(tmp_path):
    """An ImageNet-100 tree of 3000x3000 PNGs (about a second each to convert), prepared; yields a function
    that starts `convert` on it in its own process group. Processes still running at the end are killed."""
    make_tree(tmp_path / "tree", imagenet100_classes(), per_split=(("train", 1), ("val", 1)))
    big = tmp_path / "big.png"
    Image.new("RGB", (3000, 3000)).save(big)
    for image in (tmp_path / "tree").glob("*/*/*"):
        shutil.copy(big, image)
    params = write_params(tmp_path / "p.yaml", datasets={"imagenet100": {"root": str(tmp_path / "tree")}})
    args = ["--dataset", "imagenet100", "--params", str(params)]
    assert stage_process("prepare", *args, "--out", str(tmp_path / "raw")).wait(60) == 0
    started = []

    def start() -> subprocess.Popen:
        started.append(stage_process("convert", *args, *convert_args(tmp_path)))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_until_writing(process: subprocess.Popen) -> Path:
    """The shared-memory segment of `process`'s .beton writer, once it exists (the workers are writing)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if segments := list(SHM.glob(f"{SHM_PREFIX}{process.pid}_*")):
            return segments[0]
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.05)
    raise AssertionError("convert did not start writing within 120 s")


def wait_until_gone(process_group: int, timeout_s: float) -> None:
    """Until no process of the group is left (workers, FFCV's resource tracker)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(process_group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of group {process_group} still run after {timeout_s} s")


@needs_shm
@pytest.mark.parametrize("delay_s", [0, 2])
def test_ctrl_c_stops_convert_within_seconds_and_leaves_nothing(tmp_path, slow_conversion, delay_s):
    """Issue 14: Ctrl-C (SIGINT to the process group) during `convert` did not stop it within 60 s. Sent
    as the workers start (delay 0), it used to be lost: Python drops an exception raised inside a fork."""
    process = slow_conversion()
    segment = wait_until_writing(process)
    time.sleep(delay_s)
    os.killpg(process.pid, signal.SIGINT)
    output = process.communicate(timeout=20)[0]
    assert process.returncode == 130 and "error: interrupted" in output and "Traceback" not in output, output
    wait_until_gone(process.pid, 10)
    assert not segment.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png", "p.yaml", "raw", "tree"]


@needs_shm
def test_convert_after_sigkill_removes_what_the_killed_run_left(tmp_path, slow_conversion):
    """Issue 14: after SIGKILL, `.ffcv.partial/` and the writer's segment in /dev/shm stayed behind."""
    killed = slow_conversion()
    segment = wait_until_writing(killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert segment.exists() and (tmp_path / ".ffcv.partial").is_dir()  # what no cleanup code can prevent
    make_tree(tmp_path / "tree", imagenet100_classes(), per_split=(("train", 1), ("val", 1)))  # small images now
    rerun = slow_conversion()
    assert rerun.wait(120) == 0, rerun.communicate()[0]
    assert not segment.exists() and not (tmp_path / ".ffcv.partial").exists()
    assert sorted(p.name for p in (tmp_path / "ffcv").iterdir()) == ["test.beton", "train.beton"]
