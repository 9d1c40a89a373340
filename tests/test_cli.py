import inspect
import re

import pytest
import typer
from typer.core import TyperArgument, TyperOption
from typer.testing import CliRunner

from pipeline.errors import ParamsError
from stages.cli import app
from tests.helpers import convert_args, write_params

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
