"""The machine record: what it says comes from the process's actual CPU code path, not from a constant."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.provenance import CODE_VERSION_VARIABLE
from tests.helpers import REPO

RECORD = "import torch; from pipeline.provenance import machine; print(machine(torch.device('cpu')).model_dump_json())"


def record(**env: str) -> dict:
    """The machine record of a fresh process under `env` (oneDNN reads its ISA cap when it starts)."""
    run = subprocess.run(
        [sys.executable, "-c", RECORD], cwd=REPO, env=os.environ | env, capture_output=True, text=True, check=True
    )
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_the_record_names_the_code_path_the_process_runs():
    scalar = record(ONEDNN_MAX_CPU_ISA="SSE41", ATEN_CPU_CAPABILITY="default")
    assert scalar["onednn_isa"] == "Intel SSE4.1" and scalar["cpu_capability"] == "DEFAULT"
    native = record()
    assert (
        native["onednn_isa"] not in ("unknown", "Intel SSE4.1") or torch.backends.cpu.get_cpu_capability() == "DEFAULT"
    )
    assert native["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert native["torch"] == torch.__version__ and native["threads"] >= 1 and native["gpu"] is None
    assert native["code_version"] != "unknown"  # the repository's git describe
    assert record(**{CODE_VERSION_VARIABLE: "v1.2-3-gabc1234"})["code_version"] == "v1.2-3-gabc1234"  # a copy's source
