"""Test helpers: a local HTTP server for downloads, generated CIFAR archives, image trees, params files, tiny
settings, running a stage in its own process, running a function on CPU ranks of a process group.

Fixtures built on these live in conftest.py.
"""

import io
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from ruamel.yaml import YAML

from pipeline.datasets.cifar import PIXEL_BYTES, RecordLayout

REPO = Path(__file__).resolve().parents[1]
# The genuine CIFAR-10 test batch (development and CI machines only); tests that need it skip without it.
SHARED_DATA = Path(os.environ.get("PROJECTOR_IB_SHARED_DATA", REPO.parent / "shared" / "data")) / "cifar-10-batches-bin"


class ArchiveServer(ThreadingHTTPServer):
    """Serves `files` on 127.0.0.1 with HTTP Range support; `drop_after[path]` bytes cut the next response."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: ArchiveServer

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if self.headers.get("Range") else 0
        if start >= len(body) and start:
            self.send_error(416)
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = self.server.drop_after.pop(self.path, None)
        self.wfile.write(body[start : cut if cut is None else start + cut])
        self.close_connection = True

    def log_message(self, *args):
        pass


def record_bytes(layout: RecordLayout, images: np.ndarray, labels: np.ndarray) -> bytes:
    """Records in the official layout; CIFAR-100 coarse labels are label // 5 (any value would do)."""
    label_columns = [labels // 5, labels] if layout.label_bytes == 2 else [labels]
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), PIXEL_BYTES)
    return np.concatenate([np.stack(label_columns, 1).astype(np.uint8), planes], 1).tobytes()


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tuple:
    """A tar member (header, bytes) of any kind: file, directory, link, device."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def cifar_archive(
    layout: RecordLayout, num_classes: int, per_file: int, seed: int = 0, extra: list[tuple] = ()
) -> tuple[bytes, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A .tar.gz in the official layout of `layout` with random records (plus `extra` members),
    and the (images, labels) each record file holds."""
    rng = np.random.default_rng(seed)
    contents = {}
    members = [member(layout.folder, kind=tarfile.DIRTYPE)]
    for name in (*layout.train, layout.test):
        images = rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, num_classes, per_file)
        contents[name] = (images, labels)
        members.append(member(f"{layout.folder}/{name}", record_bytes(layout, images, labels)))
    names = "".join(f"class_{c}\n" for c in range(num_classes)).encode()
    members += [
        member(f"{layout.folder}/{layout.names}", names),
        member(f"{layout.folder}/readme.html", b"<html></html>"),
        *extra,
    ]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buffer.getvalue(), contents


def write_params(path: Path, base: Path = REPO / "params.yaml", **sections) -> Path:
    """`base` (the committed params.yaml) with `sections` merged in (nested dicts), written to `path`."""
    yaml = YAML()
    data = yaml.load(base.read_text())
    _merge(data, sections)
    with open(path, "w") as f:
        yaml.dump(data, f)
    return path


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key != "member_md5":  # a map is data
            _merge(into[key], value)
        else:
            into[key] = value


TINY_COMMON = {
    "epochs": 3,
    "warmup_epochs": 1,
    "batch_size": 16,
    "backbone_width": 4,
    "projector_hidden_dim": 32,
    "projector_out_dim": 16,
}
TINY_CELL = {"common": TINY_COMMON, "variants": {"sae": {"sae_latent_dim": 64, "sae_topk": 4}}}
TINY_EVAL = {"epochs": 2, "batch_size": 16, "warmup_epochs": 0}
TABLE_ONLY = {"bounds": {"points": []}, "ablations": {"points": []}}  # params' `figures` that add no cells


def tiny_sections(**common) -> dict:
    """Params sections for seconds-long CPU pretraining and evaluation on an 80-image synthetic dataset;
    `common` overrides `pretrain.synthetic.<method>.common`."""
    cell = TINY_CELL | {"common": TINY_COMMON | common}
    return {
        "figures": TABLE_ONLY,
        "datasets": {"synthetic": {"train_per_class": 8, "test_per_class": 4}},
        "training": {"loader_workers": 1, "eval_batch_size": 64},
        "pretrain": {"synthetic": {m: cell for m in ("simclr", "barlow_twins")}},
        "linear_eval": {"probe": {"epochs": 5}, "synthetic": {m: TINY_EVAL for m in ("simclr", "barlow_twins")}},
    }


def tiny_params(path: Path, **common) -> Path:
    return write_params(path, **tiny_sections(**common))


def make_tree(root, classes, per_split=((("train", 2), ("val", 1))), size=(12, 10), fmt="JPEG"):
    """Solid-colour images whose red channel encodes the class index."""
    for folder, count in per_split:
        for label, name in enumerate(classes):
            (root / folder / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                suffix = ".JPEG" if fmt == "JPEG" else ".png"
                Image.new("RGB", size, (label * 2, 100, 50 + i)).save(root / folder / name / f"{i}{suffix}", fmt)


def write_png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG of (H, W) grayscale or (H, W, 3) RGB uint16 `pixels` (Pillow cannot write 16-bit RGB)."""
    height, width = pixels.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2 if pixels.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def stage_process(*args: str, **kwargs) -> subprocess.Popen:
    """`python -m stages ARGS` in its own process group (signals reach it and its workers, as Ctrl-C does)."""
    return subprocess.Popen(
        [sys.executable, "-m", "stages", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def pretrain_args(params: Path, dataset: Path, out: Path) -> list[str]:
    """`pretrain`'s arguments for the tiny dataset's Barlow Twins baseline, seed 0, into `out`."""
    cell = ["--dataset", "synthetic", "--method", "barlow_twins", "--variant", "baseline", "--seed", "0"]
    inputs = ["--data", str(dataset / "ffcv"), "--metadata", str(dataset / "meta.json")]
    outputs = ["--out", str(out), "--metrics", str(out / "metrics.json")]
    return ["pretrain", "--params", str(params), *cell, *inputs, *outputs]


def convert_args(root: Path, metadata: Path | None = None) -> list[str]:
    """`convert`'s paths: root/raw (what `prepare --out root/raw` wrote) to root/ffcv and `metadata`
    (default root/meta.json)."""
    return ["--raw", str(root / "raw"), "--out", str(root / "ffcv"), "--metadata", str(metadata or root / "meta.json")]


WORLD = 2  # ranks of the CPU process groups of the distributed tests


def on_ranks(function: Callable[..., dict], folder: Path, *args) -> list[dict]:
    """`function(*args)` on each of WORLD processes of one gloo process group (CPU, one thread each), as torchrun
    runs a stage; the dicts they return (tensors, numbers, strings), in rank order."""
    mp.spawn(_on_rank, args=(function, str(folder), args), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD)]


def _on_rank(rank: int, function: Callable[..., dict], folder: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    try:
        torch.save(function(*args), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
