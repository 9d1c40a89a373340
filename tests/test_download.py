"""The real download path against a local HTTP server serving archives made here in the official layout."""

import hashlib
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.datasets import get_dataset
from pipeline.datasets.cifar import CIFAR10, CIFAR100
from pipeline.datasets.download import download
from pipeline.errors import UserError
from pipeline.params import load_params
from stages.cli import app
from tests.helpers import cifar_archive, member, write_params


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def serve(server, tmp_path, name, archive, archive_md5=None, member_md5=None):
    """Serve `archive` and return params pointing dataset `name` at it."""
    server.files[f"/{name}.tar.gz"] = archive
    section = {"url": server.url(f"/{name}.tar.gz"), "md5": archive_md5 or md5(archive), "member_md5": member_md5 or {}}
    return load_params(write_params(tmp_path / "params.yaml", datasets={name: section}, download={"retries": 2}))


@pytest.mark.parametrize("name, layout, num_classes", [("cifar10", CIFAR10, 10), ("cifar100", CIFAR100, 100)])
def test_prepare_downloads_verifies_and_extracts(server, tmp_path, name, layout, num_classes):
    archive, contents = cifar_archive(layout, num_classes, per_file=20)
    params = serve(server, tmp_path, name, archive)
    spec = get_dataset(name)
    spec.prepare(params, tmp_path / "raw", tmp_path / "downloads")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted((*layout.train, layout.test, layout.names))
    data = spec.load(tmp_path / "raw")
    assert len(data.classes) == num_classes
    train_images = np.concatenate([contents[n][0] for n in layout.train])
    np.testing.assert_array_equal(data.train.images, train_images)
    np.testing.assert_array_equal(data.test.labels, contents[layout.test][1])


def test_member_md5s_are_checked(server, tmp_path):
    archive, contents = cifar_archive(CIFAR10, 10, per_file=5)
    params = serve(server, tmp_path, "cifar10", archive, member_md5={"test_batch.bin": "0" * 32})
    with pytest.raises(UserError, match=r"test_batch.bin has MD5 [0-9a-f]{32}, but datasets.cifar10.member_md5"):
        get_dataset("cifar10").prepare(params, tmp_path / "raw", tmp_path / "downloads")
    assert not (tmp_path / "raw").exists()


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    archive, _ = cifar_archive(CIFAR10, 10, per_file=50)
    server.files["/a.tar.gz"] = archive
    server.drop_after["/a.tar.gz"] = len(archive) // 3
    path = download(server.url("/a.tar.gz"), tmp_path / "a.tar.gz", md5(archive), retries=1, timeout_s=5, md5_key="k")
    assert path.read_bytes() == archive
    assert server.requests == [("/a.tar.gz", None), ("/a.tar.gz", f"bytes={len(archive) // 3}-")]


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    archive = bytes(range(256)) * 1000
    server.files["/a.bin"] = archive
    (tmp_path / "a.bin.part").write_bytes(archive[:1000])
    download(server.url("/a.bin"), tmp_path / "a.bin", md5(archive), retries=0, timeout_s=5, md5_key="k")
    assert (tmp_path / "a.bin").read_bytes() == archive
    assert server.requests == [("/a.bin", "bytes=1000-")]
    assert not (tmp_path / "a.bin.part").exists()


def test_verified_archive_is_not_downloaded_again(server, tmp_path):
    archive = b"x" * 100
    server.files["/a.bin"] = archive
    for _ in range(2):
        download(server.url("/a.bin"), tmp_path / "a.bin", md5(archive), retries=0, timeout_s=5, md5_key="k")
    assert len(server.requests) == 1


def test_failed_attempts_keep_the_partial_file(server, tmp_path):
    server.files["/a.bin"] = b"y" * 5000
    server.drop_after["/a.bin"] = 1200
    with pytest.raises(UserError, match=r"failed after 1 attempt.*1200 bytes received are kept"):
        download(server.url("/a.bin"), tmp_path / "a.bin", md5(b"y" * 5000), retries=0, timeout_s=5, md5_key="k")
    assert (tmp_path / "a.bin.part").stat().st_size == 1200 and not (tmp_path / "a.bin").exists()


def test_wrong_checksum_deletes_download_and_writes_nothing(server, tmp_path):
    archive, _ = cifar_archive(CIFAR10, 10, per_file=5)
    params = serve(server, tmp_path, "cifar10", archive, archive_md5="f" * 32)
    with pytest.raises(UserError, match=r"MD5 [0-9a-f]{32} but datasets.cifar10.md5 is f{32}"):
        get_dataset("cifar10").prepare(params, tmp_path / "raw", tmp_path / "downloads")
    assert list((tmp_path / "downloads").iterdir()) == [] and not (tmp_path / "raw").exists()


def test_truncated_archive_is_refused(server, tmp_path):
    archive, _ = cifar_archive(CIFAR10, 10, per_file=50)
    truncated = archive[: len(archive) // 2]
    params = serve(server, tmp_path, "cifar10", truncated)  # checksum of the truncated bytes: it passes the gate
    with pytest.raises(UserError, match="corrupt or truncated archive"):
        get_dataset("cifar10").prepare(params, tmp_path / "raw", tmp_path / "downloads")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads", "params.yaml"]


@pytest.mark.parametrize(
    "evil, message",
    [
        (member("../../escape.bin", b"evil"), "unsafe path '../../escape.bin'"),
        (member("/etc/evil.bin", b"evil"), "unsafe path '/etc/evil.bin'"),
        (member("cifar-10-batches-bin/link", kind=tarfile.SYMTYPE, linkname="/etc/passwd"), "links and devices"),
        (
            member("cifar-10-batches-bin/hard", kind=tarfile.LNKTYPE, linkname="cifar-10-batches-bin/readme.html"),
            "links and devices",
        ),
        (member("cifar-10-batches-bin/dev", kind=tarfile.CHRTYPE), "links and devices"),
    ],
)
def test_malicious_members_reject_the_archive(server, tmp_path, evil, message):
    archive, _ = cifar_archive(CIFAR10, 10, per_file=5, extra=[evil])
    params = serve(server, tmp_path, "cifar10", archive)
    with pytest.raises(UserError, match=message):
        get_dataset("cifar10").prepare(params, tmp_path / "work" / "raw", tmp_path / "downloads")
    assert list((tmp_path / "work").iterdir()) == []  # no output, no staging folder
    assert not (tmp_path / "escape.bin").exists()


def test_oversize_member_is_refused(server, tmp_path):
    huge = member("cifar-10-batches-bin/batches.meta.txt", b"a" * (2 << 20))  # a second copy, too large
    archive, _ = cifar_archive(CIFAR10, 10, per_file=5, extra=[huge])
    params = serve(server, tmp_path, "cifar10", archive)
    with pytest.raises(UserError, match="batches.meta.txt is 2097152 bytes, more than the 1048576"):
        get_dataset("cifar10").prepare(params, tmp_path / "raw", tmp_path / "downloads")


def test_http_error_is_reported_without_retrying(server, tmp_path):
    with pytest.raises(UserError, match="HTTP 404"):
        download(server.url("/missing"), tmp_path / "a", "0" * 32, retries=3, timeout_s=5, md5_key="k")
    assert len(server.requests) == 1


def test_failed_download_that_received_nothing_says_so(tmp_path):
    """Issue 14: the error claimed a partial file was kept in downloads/...part when nothing was written."""
    with pytest.raises(UserError) as error:
        download("http://127.0.0.1:9/a.tar.gz", tmp_path / "a.tar.gz", "0" * 32, retries=0, timeout_s=5, md5_key="k")
    assert "nothing was received" in str(error.value) and "kept" not in str(error.value)
    assert f"to work offline, put the archive (MD5 {'0' * 32}) at {tmp_path / 'a.tar.gz'}" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_archive_placed_in_downloads_works_offline(tmp_path):
    """The offline route (docs/usage.md, "Datasets"): the official archive copied to downloads/<dataset>.tar.gz
    passes the MD5 gate, and nothing is fetched (the URL points at a closed port)."""
    archive, _ = cifar_archive(CIFAR10, 10, per_file=5)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "cifar10.tar.gz").write_bytes(archive)
    params = write_params(
        tmp_path / "p.yaml",
        datasets={"cifar10": {"url": "http://127.0.0.1:9/cifar.tar.gz", "md5": md5(archive), "member_md5": {}}},
    )
    result = CliRunner().invoke(
        app,
        [
            "prepare",
            "--dataset",
            "cifar10",
            "--out",
            str(tmp_path / "raw"),
            "--downloads",
            str(tmp_path / "downloads"),
            "--params",
            str(params),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "already downloaded, MD5 verified" in result.output
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted((*CIFAR10.train, CIFAR10.test, CIFAR10.names))
