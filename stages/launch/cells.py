"""The cells of the DVC matrix and which of them are stale, read from DVC itself (`dvc dag`, `dvc status`),
never from params.yaml: whatever the matrix's axes, a cell is `pretrain@KEY` and the stages below it that
share its matrix key (`linear-eval@KEY`), or an `untrained@KEY` evaluation alone; a group named after a root
(`pretrain-bounds@KEY`, a figure's cells) starts cells too."""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError

CELL_ROOTS = ("pretrain", "untrained")  # the stage groups that start a cell, and those named ROOT-<something>
EDGE = re.compile(r'^"(?P<parent>[^"]+)" -> "(?P<child>[^"]+)";$')  # a line of `dvc dag --dot`
NODE = re.compile(r'^"(?P<name>[^"]+)";$')


@dataclass(frozen=True)
class Cell:
    key: str  # the matrix key, e.g. synthetic-simclr-baseline-0
    stages: tuple[str, ...]  # in run order, e.g. ("pretrain@KEY", "linear-eval@KEY")


@dataclass(frozen=True)
class Plan:
    data_stages: tuple[str, ...]  # the stages cells depend on that are not cells (convert@...): run once, first
    cells: tuple[Cell, ...]  # every cell of the matrix


def dvc_env(**extra: str) -> dict[str, str]:
    """The environment for DVC and the stage commands it runs: this interpreter's `python` first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **extra}


def dvc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def read_plan() -> Plan:
    """The cells and the data stages above them, from the DAG of `dvc.yaml` in the working directory."""
    if not Path("dvc.yaml").is_file():
        raise UserError(f"no dvc.yaml in {Path.cwd()}: run `launch` at the root of the project")
    nodes, edges = [], []
    for line in _dvc("dag", "--dot").splitlines():
        if edge := EDGE.match(line):
            edges.append((edge["parent"], edge["child"]))
        elif node := NODE.match(line):
            nodes.append(node["name"])
    children = {node: [c for p, c in edges if p == node] for node in nodes}
    cells = tuple(_cell(name, children) for name in nodes if _starts_a_cell(name))
    in_cells = {stage for cell in cells for stage in cell.stages}
    data = tuple(dict.fromkeys(p for p, c in edges if c in in_cells and p not in in_cells))
    return Plan(data_stages=data, cells=cells)


def _starts_a_cell(name: str) -> bool:
    group = name.split("@")[0]
    return "@" in name and any(group == root or group.startswith(f"{root}-") for root in CELL_ROOTS)


def _cell(root: str, children: dict[str, list[str]]) -> Cell:
    """`root` (e.g. pretrain@KEY), then the stages below it with the same key, breadth first (parents first).
    The cell's name is KEY for pretraining, else the root's name with its @ as a dash (untrained-KEY)."""
    key = root.split("@", 1)[1]
    stages = [root]
    for stage in stages:
        stages += [c for c in children[stage] if c.endswith(f"@{key}") and c not in stages]
    return Cell(key=key if root.startswith("pretrain") else root.replace("@", "-"), stages=tuple(stages))


def run_data_stages(plan: Plan) -> None:
    """`dvc repro` of the data stages (and what they depend on), output shown as it comes."""
    if not plan.data_stages:
        return
    if subprocess.run(dvc_command("--wait-for-lock", "repro", *plan.data_stages), env=dvc_env()).returncode:
        raise UserError(f"the data stages failed (output above): {' '.join(plan.data_stages)}")


def stale_stages() -> set[str]:
    """The stages `dvc status` reports as changed (missing outputs, changed deps, params or code)."""
    return set(json.loads(_dvc("status", "--json") or "{}"))


def _dvc(*args: str) -> str:
    result = subprocess.run(dvc_command(*args), env=dvc_env(), capture_output=True, text=True)
    if result.returncode:
        raise UserError(f"`dvc {' '.join(args)}` failed:\n{result.stderr.strip()}")
    return result.stdout
