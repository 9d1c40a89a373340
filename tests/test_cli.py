import inspect
import re
from pathlib import Path

import pytest
import typer
from typer.core import TyperArgument, TyperOption
from typer.testing import CliRunner

from pipeline.errors import ParamsError
from stages.cli import app
from tests.helpers import REPO, convert_args, tiny_sections, write_params
from tests.test_report import EXPERIMENT, write_cells

runner = CliRunner()


COMMANDS = typer.main.get_command(app).commands  # name -> command, every command of the app


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)], ids=["app", *COMMANDS])
def test_every_command_has_help_without_bool_after_flags(command):
    """Typer 0.29's rich help printed `--help <bool>` and `--debug <bool>`, as if they took a value."""
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    assert "--help " in result.output and "<bool>" not in result.output, result.output


def test_the_command_list_shows_each_summary_on_one_line():
    """The list kept the docstrings' line breaks (`bench`: "... first, (e) the" then "start-up of ...")."""
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "1000"})
    for command in COMMANDS.values():
        summary = " ".join(inspect.cleandoc(command.help or "").split("\n\n")[0].split())
        assert summary in result.output, f"{command.name}: {summary}"


# Help that names no content: the report's five folders were all "A folder (see dvc.yaml)."
VAGUE = re.compile(r"^(an?|the) (\w+ )?(folder|file|path)\.?$|see dvc\.yaml", re.IGNORECASE)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_path_option_says_what_it_holds(name):
    paths = [
        p for p in COMMANDS[name].params if isinstance(p, TyperArgument | TyperOption) and p.type_descriptor.is_path
    ]
    helps = [p.help or "" for p in paths]
    for param, text in zip(paths, helps):
        assert text and not VAGUE.search(text), f"{name} {param.name}: {text!r}"
    assert len(set(helps)) == len(helps), f"{name}: path options share a help text: {helps}"


def test_unknown_dataset_lists_choices(tmp_path):
    result = runner.invoke(
        app,
        [
            "prepare",
            "--dataset",
            "mnist",
            "--out",
            str(tmp_path / "o"),
            "--downloads",
            str(tmp_path / "d"),
            "--params",
            str(write_params(tmp_path / "p.yaml")),
        ],
    )
    assert result.exit_code == 1
    assert "unknown dataset 'mnist'; choose from cifar10, cifar100, imagenet100, synthetic, folder" in result.output


def test_stage_refuses_bad_params_before_doing_anything(tmp_path):
    params = write_params(tmp_path / "p.yaml", datasets={"synthetic": {"num_classes": 0}})
    result = runner.invoke(
        app,
        [
            "prepare",
            "--dataset",
            "synthetic",
            "--out",
            str(tmp_path / "o"),
            "--downloads",
            str(tmp_path / "d"),
            "--params",
            str(params),
        ],
    )
    assert result.exit_code == 2 and "datasets.synthetic.num_classes: found 0" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


def test_prepare_and_convert_from_the_command_line(tmp_path):
    params = str(write_params(tmp_path / "p.yaml", datasets={"synthetic": {"train_per_class": 3, "test_per_class": 2}}))
    common = ["--dataset", "synthetic", "--params", params]
    assert runner.invoke(app, ["prepare", *common, "--out", str(tmp_path / "raw"), "--downloads", "d"]).exit_code == 0
    result = runner.invoke(app, ["convert", *common, *convert_args(tmp_path, tmp_path / "m" / "meta.json")])
    assert result.exit_code == 0, result.output
    assert '"count": 30' in (tmp_path / "m" / "meta.json").read_text()


def test_debug_shows_the_traceback_of_an_input_error(tmp_path):
    plain = runner.invoke(app, ["check-params", "--params", str(tmp_path)])
    debug = runner.invoke(app, ["--debug", "check-params", "--params", str(tmp_path)])
    assert (
        plain.exit_code == 2
        and plain.output == f"error: {tmp_path}: is a directory; --params takes a YAML file such as params.yaml\n"
    )
    assert isinstance(debug.exception, ParamsError) and debug.exc_info[2] is not None


def test_prepare_needs_downloads_only_for_archives(tmp_path):
    """Issue 14: `prepare` asked for --downloads for datasets that never download."""
    params = str(write_params(tmp_path / "p.yaml", datasets={"synthetic": {"train_per_class": 2, "test_per_class": 1}}))
    synthetic = runner.invoke(
        app, ["prepare", "--dataset", "synthetic", "--out", str(tmp_path / "raw"), "--params", params]
    )
    assert synthetic.exit_code == 0, synthetic.output
    cifar = runner.invoke(app, ["prepare", "--dataset", "cifar10", "--out", str(tmp_path / "c"), "--params", params])
    assert cifar.exit_code == 1
    assert cifar.output == "error: --downloads is required for cifar10: the folder where its archive is cached\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml", "raw"]


@pytest.mark.parametrize("option", ["--batches", "--steps", "--workers"])
def test_bench_refuses_a_count_below_one_before_doing_anything(tmp_path, option):
    paths = [f"--{name}={tmp_path / name}" for name in ("raw", "data", "metadata", "out")]
    result = runner.invoke(app, ["bench", "--dataset", "synthetic", *paths, option, "0"])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}': Input should be greater than or equal to 1" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["pretrain", "linear-eval"])
@pytest.mark.parametrize(
    "cell, message",
    [
        ({"dataset": "cifar11"}, "unknown dataset 'cifar11'; choose from cifar10, cifar100, imagenet100"),
        ({"method": "simclrr"}, "unknown method 'simclrr'; choose from simclr, barlow_twins"),
        ({"variant": "mi_regg"}, "unknown variant 'mi_regg'; pretrain.synthetic.simclr.variants defines baseline"),
    ],
)
def test_an_unknown_selector_is_named_before_any_file(tmp_path, command, cell, message):
    """Issue 20: `pretrain --dataset cifar11` with a wrong --metadata complained about the metadata first."""
    selectors = {"dataset": "synthetic", "method": "simclr", "variant": "baseline", "seed": "0"} | cell
    files = ["--data", str(tmp_path / "absent"), "--metadata", str(tmp_path / "absent.json")]
    outputs = {
        "pretrain": ["--out", str(tmp_path / "run"), "--metrics", str(tmp_path / "m.json")],
        "linear-eval": ["--checkpoint", str(tmp_path / "absent.pt"), "--metrics", str(tmp_path / "m.json")],
    }[command]
    args = [f"--{key}={value}" for key, value in selectors.items()]
    result = runner.invoke(app, [command, *args, *files, *outputs, "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 1 and result.output.startswith(f"error: {message}"), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_check_params_warns_of_datasets_that_cannot_be_prepared():
    """Issue 20: the committed params passed although `experiment` includes imagenet100 with `root: null`."""
    result = runner.invoke(app, ["check-params", "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert (
        "warning: imagenet100 cannot be prepared as configured: datasets.imagenet100.root is not set" in result.output
    )
    assert "cifar10" not in result.output.split("warning:")[1]  # downloaded: nothing to warn about


def stage_args(tiny_dataset: Path, root: Path) -> dict[str, dict[str, str]]:
    """Valid path options of every stage that reads or writes files: inputs from the tiny dataset and the
    report's metrics (tests/test_report.py's cells, written under `root`), outputs under `root`."""
    write_cells(root)
    data = {"--data": str(tiny_dataset / "ffcv"), "--metadata": str(tiny_dataset / "meta.json")}
    return {
        "prepare": {"--out": str(root / "raw"), "--downloads": str(root / "downloads")},
        "convert": {
            "--raw": str(tiny_dataset / "raw"),
            "--out": str(root / "ffcv"),
            "--metadata": str(root / "m.json"),
        },
        "pretrain": data | {"--out": str(root / "run"), "--metrics": str(root / "p.json")},
        # a checkpoint that is never read: every other bad option must be refused before it
        "linear-eval": data | {"--checkpoint": str(root / "never-read.pt"), "--metrics": str(root / "l.json")},
        "report": {
            "--pretrain-metrics": str(root / "pretrain"),
            "--linear-metrics": str(root / "linear_eval"),
            "--untrained-metrics": str(root / "untrained"),
            "--provenance": str(root / "provenance"),
            "--runs": str(root / "runs"),
            "--reference": str(REPO / "references" / "paper.yaml"),
            "--out": str(root / "reports"),
            "--summary": str(root / "report.json"),
        },
    }


SELECTORS = {
    "prepare": ["--dataset", "cifar10"],  # the one dataset that uses --downloads (refused before any download)
    "convert": ["--dataset", "synthetic"],
    "pretrain": ["--dataset", "synthetic", "--method", "simclr", "--variant", "baseline", "--seed", "0"],
    "linear-eval": ["--dataset", "synthetic", "--method", "simclr", "--variant", "baseline", "--seed", "0"],
    "report": [],
}
BAD_PATHS = {  # each kind of bad path, and the path its message must name, under the test's folder
    "absent": ("absent", "absent"),
    "under a file": ("file/x", "file"),
    "a folder": (".", "."),
}


@pytest.mark.parametrize(
    "command, option, bad",
    [
        ("prepare", "--out", "under a file"),
        ("prepare", "--downloads", "under a file"),
        ("convert", "--raw", "absent"),
        ("convert", "--out", "under a file"),
        ("convert", "--metadata", "under a file"),
        ("convert", "--metadata", "a folder"),
        ("pretrain", "--data", "absent"),
        ("pretrain", "--metadata", "absent"),
        ("pretrain", "--metadata", "a folder"),
        ("pretrain", "--out", "under a file"),
        ("pretrain", "--metrics", "under a file"),
        ("pretrain", "--metrics", "a folder"),
        ("linear-eval", "--data", "absent"),
        ("linear-eval", "--metadata", "absent"),
        ("linear-eval", "--checkpoint", "absent"),
        ("linear-eval", "--checkpoint", "a folder"),
        ("linear-eval", "--metrics", "under a file"),
        ("report", "--pretrain-metrics", "absent"),
        ("report", "--linear-metrics", "absent"),
        ("report", "--untrained-metrics", "absent"),
        ("report", "--provenance", "absent"),
        ("report", "--runs", "absent"),
        ("report", "--reference", "absent"),
        ("report", "--reference", "a folder"),
        ("report", "--out", "under a file"),
        ("report", "--summary", "under a file"),
        ("pretrain", "--provenance", "under a file"),
        ("linear-eval", "--provenance", "under a file"),
    ],
)
def test_a_bad_path_option_is_one_line_naming_it(tiny_dataset, tmp_path, command, option, bad):
    """Issue 20: `report --reference` naming a missing file was a traceback; so were other path options that
    reached open() unchecked. Each bad path now stops the stage at once with one line naming it, and nothing
    is written."""
    (tmp_path / "file").write_text("a file, not a folder")
    args = stage_args(tiny_dataset, tmp_path)
    path, named = (tmp_path / part for part in BAD_PATHS[bad])
    options = args[command] | {option: str(path)}
    params = write_params(tmp_path / "p.yaml", **tiny_sections(), experiment=EXPERIMENT.model_dump())
    before = sorted(tmp_path.rglob("*"))
    result = runner.invoke(app, [command, *SELECTORS[command], *sum(options.items(), ()), "--params", str(params)])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, (result.exception, result.output)
    assert result.output.startswith("error: ") and len(result.output.splitlines()) == 1, result.output
    assert f"{named.resolve()}" in result.output or f"{named}" in result.output, result.output
    assert sorted(tmp_path.rglob("*")) == before and not (tmp_path.parent / f".{tmp_path.name}.partial").exists()
