import hashlib

import numpy as np
import pytest

from pipeline.datasets.cifar import CIFAR10, CIFAR100, read_records
from pipeline.errors import UserError
from tests.helpers import SHARED_DATA, record_bytes

TEST_BATCH = SHARED_DATA / "test_batch.bin"
# Pinned by the project (issue 2): the genuine CIFAR-10 test batch as (10000, 32, 32, 3) uint8 in file order.
IMAGES_SHA256 = "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04"
LABELS_SHA256 = "cbb7365de8ed11f05cc4c3a1e7f78144127c5e851efd83762fb18202461230bb"
needs_genuine = pytest.mark.skipif(not TEST_BATCH.exists(), reason="genuine CIFAR-10 test batch absent")


@needs_genuine
def test_genuine_cifar10_test_batch():
    images, labels = read_records(TEST_BATCH, CIFAR10)
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    assert labels[:7].tolist() == [3, 8, 8, 0, 6, 6, 1]
    assert np.bincount(labels).tolist() == [1000] * 10
    assert hashlib.sha256(images.tobytes()).hexdigest() == IMAGES_SHA256
    assert hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest() == LABELS_SHA256


def test_records_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 7)
    (tmp_path / "r.bin").write_bytes(record_bytes(CIFAR10, images, labels))
    got_images, got_labels = read_records(tmp_path / "r.bin", CIFAR10)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_record_pixels_are_planes_not_interleaved(tmp_path):
    record = np.zeros(1 + 3072, np.uint8)
    record[0], record[1 + 0], record[1 + 1024 + 1], record[1 + 2048 + 32] = 7, 10, 20, 30
    record.tofile(tmp_path / "r.bin")
    images, labels = read_records(tmp_path / "r.bin", CIFAR10)
    assert labels.tolist() == [7]
    assert images[0, 0, 0, 0] == 10 and images[0, 0, 1, 1] == 20 and images[0, 1, 0, 2] == 30  # (row, col, channel)


def test_cifar100_uses_fine_labels(tmp_path):
    images = np.zeros((3, 32, 32, 3), np.uint8)
    (tmp_path / "r.bin").write_bytes(record_bytes(CIFAR100, images, np.array([99, 42, 5])))
    _, labels = read_records(tmp_path / "r.bin", CIFAR100)
    assert labels.tolist() == [99, 42, 5]


def test_partial_record_is_refused(tmp_path):
    (tmp_path / "r.bin").write_bytes(b"\0" * 3074)
    with pytest.raises(UserError, match="not a whole number of 3073-byte records"):
        read_records(tmp_path / "r.bin", CIFAR10)
