"""Write-then-read round trips through real .beton files and the FFCV loaders."""

import hashlib
import json

import numpy as np
import pytest
import torch

from pipeline.beton import channel_stats, convert_dataset, write_beton
from pipeline.datasets.cifar import CIFAR10, SYNTHETIC, write_records
from pipeline.datasets.splits import ArraySplit
from pipeline.errors import UserError
from pipeline.loaders import eval_loader, ssl_loader
from tests.helpers import SHARED_DATA
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


def test_ssl_loader_yields_two_views_of_the_same_images(tmp_path):
    # Each image is constant with value = its index mod 250, so a view identifies its image.
    n = 600
    images = np.broadcast_to((np.arange(n) % 250).astype(np.uint8)[:, None, None, None], (n, 32, 32, 3)).copy()
    write_beton(ArraySplit(images, np.arange(n) % 10), tmp_path / "a.beton", {"write_mode": "raw"}, workers=1)
    batches = ssl_loader(tmp_path / "a.beton", 128, seed=0, workers=2)
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
    write_records(raw / "train.bin", rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8), np.arange(50) % 3)
    write_records(raw / "test.bin", np.full((9, 32, 32, 3), 128, np.uint8), np.array([0, 1, 2] * 3))
    (raw / SYNTHETIC.names).write_text("a\nb\nc\n")
    meta = convert_dataset("synthetic", params, raw, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test.beton", "train.beton"]
    assert meta["train"] == {"count": 50, "per_class": [17, 17, 16]} and meta["test"]["per_class"] == [3, 3, 3]
    assert meta["image_shape"] == [32, 32, 3] and meta["classes"] == ["a", "b", "c"]
    assert meta["sources_sha256"]["test.bin"] == hashlib.sha256((raw / "test.bin").read_bytes()).hexdigest()
    json.dumps(meta)  # serializable as is


def testchannel_stats_match_numpy(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, (5000, 8, 8, 3), dtype=np.uint8)
    mean, std = channel_stats(images)
    np.testing.assert_allclose(mean, (images / 255).mean((0, 1, 2)), atol=1e-4)
    np.testing.assert_allclose(std, (images / 255).std((0, 1, 2)), atol=1e-4)


class Unreadable(ArraySplit):
    def __getitem__(self, i):
        if i == 7:
            raise UserError("image 7 is unreadable")
        return super().__getitem__(i)


def test_failing_worker_raises_instead_of_hanging(tmp_path):
    images = np.zeros((40, 32, 32, 3), np.uint8)
    with pytest.raises(UserError, match="writing .*a.beton failed: image 7 is unreadable"):
        write_beton(Unreadable(images, np.zeros(40)), tmp_path / "a.beton", {"write_mode": "raw"}, workers=2)


def test_fast_ffcv_import_keeps_the_image_modes_table():
    import numba.typed
    from ffcv.fields.rgb_image import IMAGE_MODES

    assert IMAGE_MODES == {"jpg": 0, "raw": 1}
    assert numba.typed.Dict is not dict  # restored after the import
