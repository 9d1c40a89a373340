"""Where a result came from: the machine and software that computed it.

Floating-point results depend on the CPU's vector ISA (ATen's and oneDNN's kernel choice), the thread count, the
GPU and the library versions, so every stage records them beside its metrics, and the report lists the machines
its cells ran on. These records are not DVC metrics (dvc.yaml declares them as plain outputs): `dvc exp show` and
`dvc metrics diff` show the numbers that compare runs, not machine names or speeds.
"""

import functools
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import Field

from pipeline.metrics import CellMetrics
from pipeline.params import Strict

# oneDNN names its ISA in its verbose log, once per process, on its first primitive (a convolution this big)
_PROBE = "torch.nn.functional.conv2d(torch.ones(8, 16, 32, 32), torch.ones(32, 16, 3, 3))"
_ISA = re.compile(r"^onednn_verbose,.*\bisa:(.+)$", re.MULTILINE)
CODE_VERSION_VARIABLE = "PROJECTOR_IB_CODE_VERSION"  # set where the code runs from a copy: scripts/demo's workspace


class Machine(Strict):
    cpu: str = Field(description="The CPU's model name.")
    cpu_capability: str = Field(description="ATen's vector ISA (torch.backends.cpu.get_cpu_capability()).")
    onednn_isa: str = Field(description="The ISA oneDNN dispatches to, as its verbose log names it.")
    threads: int = Field(description="torch's intra-op threads.")
    gpu: str | None
    gpu_driver: str | None
    torch: str
    cuda: str | None
    cudnn: str | None
    ffcv: str | None
    python: str
    code_version: str = Field(description="`git describe --always --dirty` of the code that ran.")

    def text(self) -> str:
        gpu = f"{self.gpu} (driver {self.gpu_driver}), " if self.gpu else ""
        cuda = f", CUDA {self.cuda}, cuDNN {self.cudnn}" if self.cuda else ""
        return (
            f"{self.cpu} (ATen {self.cpu_capability}, oneDNN {self.onednn_isa}, {self.threads} threads), {gpu}"
            f"torch {self.torch}{cuda}, FFCV {self.ffcv}, Python {self.python}, code {self.code_version}"
        )


class Provenance(CellMetrics):
    """A stage's record beside its metrics file: the machine, and how fast it went (speed is no metric)."""

    machine: Machine
    images_per_s: float | None = None


def machines(records: list[Provenance]) -> list[dict]:
    """The distinct machines of `records` (as results.json lists them), each with its number of records."""
    counts = Counter(record.machine for record in records)
    return [{"machine": m.model_dump(), "records": counts[m]} for m in sorted(counts, key=Machine.text)]


def machine(device: torch.device) -> Machine:
    """The machine this process runs on (the GPU of `device` when it is one). Call it before training too:
    oneDNN names its ISA on its first use only (later, a child process is asked)."""
    cuda = device.type == "cuda"
    return Machine(
        cpu=_cpu_model(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        onednn_isa=_onednn_isa(),
        threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name(device) if cuda else None,
        gpu_driver=_gpu_driver() if cuda else None,
        torch=torch.__version__,
        cuda=torch.version.cuda if cuda else None,
        cudnn=str(torch.backends.cudnn.version()) if cuda else None,
        ffcv=_version("ffcv"),
        python=platform.python_version(),
        code_version=code_version(),
    )


@functools.cache
def code_version() -> str:
    """$PROJECTOR_IB_CODE_VERSION if set, else `git describe --always --dirty` here ("unknown" outside git)."""
    if version := os.environ.get(CODE_VERSION_VARIABLE):
        return version
    result = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _cpu_model() -> str:
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1).strip() if found else platform.processor() or platform.machine()


@functools.cache
def _onednn_isa() -> str:
    """oneDNN prints its ISA once per process, on its first primitive: read it here when this process has not
    used oneDNN yet (call `machine` early), else from a child process (which honours ONEDNN_MAX_CPU_ISA too)."""
    found = _ISA.search(_stdout_of(lambda: eval(_PROBE, {"torch": torch})))
    if not found:
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import torch; {_PROBE}",
            ],
            capture_output=True,
            text=True,
            env=os.environ | {"ONEDNN_VERBOSE": "1"},
            timeout=300,
        )
        found = _ISA.search(probe.stdout)
    return found.group(1).strip() if found else "unknown"


def _stdout_of(fn: Callable[[], object]) -> str:
    """What `fn` writes to file descriptor 1 (C libraries included) under oneDNN's verbose mode."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        captured.seek(0)
        return captured.read().decode(errors="replace")


def _gpu_driver() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    query = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
    )
    return query.stdout.splitlines()[0].strip() if query.returncode == 0 and query.stdout.strip() else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
