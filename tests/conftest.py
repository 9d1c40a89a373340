"""Shared fixtures: a local HTTP server for downloads, the committed params, a tiny converted dataset."""

import json
import threading
from pathlib import Path

import pytest

from pipeline.beton import convert_dataset
from pipeline.datasets import get_dataset
from pipeline.params import Params, load_params
from tests.helpers import REPO, ArchiveServer, tiny_params


@pytest.fixture
def server():
    server = ArchiveServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def params() -> Params:
    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The tiny synthetic dataset converted: ffcv/{train,test}.beton and meta.json."""
    root = tmp_path_factory.mktemp("synthetic")
    params = load_params(tiny_params(root / "params.yaml"))
    get_dataset("synthetic").prepare(params, root / "raw", root / "downloads")
    (root / "meta.json").write_text(json.dumps(convert_dataset("synthetic", params, root / "raw", root / "ffcv")))
    return root
