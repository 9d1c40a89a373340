"""dvc.yaml against the code: each stage depends on the library code its command runs and on params keys that
exist, and its plots name log.csv columns."""

import ast
import functools
import inspect
import re
from pathlib import Path

import pytest
import typer
from ruamel.yaml import YAML

from pipeline.metrics import COLUMNS
from pipeline.params import load_params
from pipeline.plots import CURVES
from stages.cli import app
from tests.helpers import REPO

DVC = YAML(typ="safe", pure=True).load((REPO / "dvc.yaml").read_text())
# Modules that do not change what a stage computes: messages, progress display, staging of outputs, FFCV's import.
NOT_DEPENDENCIES = {
    "pipeline/__init__.py",
    "pipeline/errors.py",
    "pipeline/progress.py",
    "pipeline/atomic.py",
    "pipeline/_ffcv.py",
}


def imported_pipeline_modules(tree: ast.AST, seen: set[Path] | None = None) -> set[Path]:
    """Files of `pipeline` that `tree` imports, directly or through other pipeline modules (any scope)."""
    seen = set() if seen is None else seen
    for node in ast.walk(tree):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        for name in names:
            if name.split(".")[0] != "pipeline":
                continue
            base = REPO / name.replace(".", "/")
            module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            if module.exists() and module not in seen:
                seen.add(module)
                imported_pipeline_modules(ast.parse(module.read_text()), seen)
    return seen


def command(cmd: str) -> tuple[Path, ast.Module]:
    """The file of a stage's command, and the code that runs it: the file's top level and the command's function."""
    function = inspect.unwrap(
        typer.main.get_command(app).commands[re.search(r"python -m stages ([\w-]+)", cmd).group(1)].callback
    )
    path = Path(inspect.getsourcefile(function))
    module = ast.parse(path.read_text())
    module.body = [n for n in module.body if not isinstance(n, ast.FunctionDef) or n.name == function.__name__]
    return path, module


@pytest.mark.parametrize("stage", list(DVC["stages"]))
def test_deps_cover_the_code_the_command_runs(stage):
    spec = DVC["stages"][stage].get("do", DVC["stages"][stage])
    deps = [
        REPO / dep
        for dep in spec["deps"]
        if not dep.startswith(("data/", "metrics/", "runs/", "references/")) and "${" not in dep
    ]
    path, code = command(spec["cmd"])
    assert path in deps, f"{stage}: {path.relative_to(REPO)} is not a dependency"
    needed = {m for m in imported_pipeline_modules(code) if str(m.relative_to(REPO)) not in NOT_DEPENDENCIES}
    missing = sorted(str(m.relative_to(REPO)) for m in needed if not any(m == d or d in m.parents for d in deps))
    assert missing == [], f"{stage} runs code it does not depend on: {missing}"


@pytest.mark.parametrize("stage", list(DVC["stages"]))
def test_params_keys_exist(stage):
    spec = DVC["stages"][stage].get("do", DVC["stages"][stage])
    params = load_params(REPO / "params.yaml").model_dump()
    values = {"item": "cifar10", "item.dataset": "cifar10", "item.method": "simclr", "item.variant": "baseline"}

    def value(name: str) -> str:  # an ${item...} of the matrix, or a params value (${figures.bounds.dataset})
        return values[name] if name.startswith("item") else functools.reduce(dict.__getitem__, name.split("."), params)

    for key in spec.get("params", []):
        node = params
        for part in re.sub(r"\$\{([\w.]+)\}", lambda m: value(m.group(1)), key).split("."):
            assert isinstance(node, dict) and part in node, f"{stage}: params key {key} is not in the schema"
            node = node[part]


def test_plot_keys_and_curves_are_log_columns():
    assert set(DVC["plots"][0]["runs"]["y"]) <= set(COLUMNS)
    assert {key for key, *_ in CURVES} <= set(COLUMNS)
