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
from pipeline.params import TrainingParams, load_params
from pipeline.plots import CURVES
from stages.cli import app
from tests.helpers import REPO

DVC = YAML(typ="safe", pure=True).load((REPO / "dvc.yaml").read_text())
# Modules that do not change what a stage computes: messages, progress display, staging of outputs, FFCV's import,
# the record of the machine it ran on (the report, which lists the machines, depends on it by name).
NOT_DEPENDENCIES = {
    "pipeline/provenance.py",
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


def training_knobs_read(trees: list[ast.AST]) -> set[str]:
    """The `training` fields that `trees` read: `training.X` or `params.training.X`."""
    return {
        node.attr
        for tree in trees
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and (
            (isinstance(node.value, ast.Name) and node.value.id == "training")
            or (isinstance(node.value, ast.Attribute) and node.value.attr == "training")
        )
    }


@pytest.mark.parametrize("stage", list(DVC["stages"]))
def test_training_knobs_that_change_numbers_are_params_of_the_stages_reading_them(stage):
    """Issue 17.4: a knob that changes results (rounding) and is not a DVC param changes them unseen by `dvc status`
    and the audit; a speed-only knob as a param would rerun stages for nothing."""
    spec = DVC["stages"][stage].get("do", DVC["stages"][stage])
    _, code = command(spec["cmd"])
    read = training_knobs_read([code, *(ast.parse(m.read_text()) for m in imported_pipeline_modules(code))])
    assert read <= set(TrainingParams.model_fields), f"{stage} reads training fields that do not exist: {read}"
    changes = {name for name in read if TrainingParams.model_fields[name].json_schema_extra["changes_numbers"]}
    params = {key for key in spec.get("params", []) if key.startswith("training.")}
    assert params == {f"training.{name}" for name in changes}


def test_plot_keys_and_curves_are_log_columns():
    curves = [spec for plot in DVC["plots"] for spec in plot.values() if "reports/curves.csv" in spec["y"]]
    plotted = [spec["y"]["reports/curves.csv"] for spec in curves]  # the figures' plots: tests/test_figures_dvc.py
    assert plotted and len(plotted) == len(set(plotted)) and set(plotted) <= set(COLUMNS)  # one plot per quantity
    assert all((REPO / spec["template"]).is_file() for spec in curves)
    assert {key for key, *_ in CURVES} <= set(COLUMNS)
