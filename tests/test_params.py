import time
from typing import Annotated, Literal, get_args

import pytest
from pydantic import Field, ValidationError
from typer.testing import CliRunner

from pipeline.datasets import DATASETS
from pipeline.errors import ParamsError
from pipeline.params import DatasetName, Strict, _fields_at, load_params
from stages.cli import app
from tests.helpers import REPO, write_params


def test_committed_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.datasets.cifar10.md5 == "c32a1d4ab5d03f1284b67883e8d87530"  # docs/method.md section 5


def test_registry_keys_are_the_params_names():
    assert set(DATASETS) == set(get_args(DatasetName))


def test_misspelled_key_names_path_and_suggests(tmp_path):
    path = write_params(tmp_path / "p.yaml", datasets={"cifar10": {"md55": "x"}})
    with pytest.raises(ParamsError, match=r"datasets\.cifar10\.md55: unknown key \(did you mean 'md5'\?\)"):
        load_params(path)


def test_bad_value_names_path_value_and_range(tmp_path):
    path = write_params(tmp_path / "p.yaml", datasets={"synthetic": {"num_classes": 1}})
    with pytest.raises(ParamsError, match=r"datasets\.synthetic\.num_classes: found 1; .*greater than or equal to 2"):
        load_params(path)


def test_unknown_dataset_name_suggests(tmp_path):
    path = write_params(tmp_path / "p.yaml", experiment={"datasets": ["cifar1O"]})
    with pytest.raises(ParamsError, match=r"experiment\.datasets\.0: found 'cifar1O'.*did you mean 'cifar10'"):
        load_params(path)


def test_every_problem_is_reported_at_once(tmp_path):
    path = write_params(tmp_path / "p.yaml", download={"retries": -1, "timeout": 3})
    with pytest.raises(ParamsError) as error:
        load_params(path)
    first, *listed = str(error.value).splitlines()
    assert first == (
        f"{path}: download.retries: found -1; Input should be greater than or equal to 0 (and 1 more problem)"
    )
    assert [line.strip().split(":")[0] for line in listed] == ["download.retries", "download.timeout"]


def test_first_line_names_the_first_problem(tmp_path):
    """Issue 14: a CI log shows one line, so it must carry a key path and its problem, not only a count."""
    path = write_params(
        tmp_path / "p.yaml", datasets={"synthetic": {"seeed": 1, "seed": None}}, download={"retries": -1}
    )
    result = CliRunner().invoke(app, ["check-params", "--params", str(path)])
    assert result.exit_code == 2
    assert result.output.splitlines()[0] == (
        f"error: {path}: download.retries: found -1; Input should be greater than or equal to 0 (and 2 more problems)"
    )


def test_strict_types_refuse_strings_for_numbers(tmp_path):
    path = write_params(tmp_path / "p.yaml", download={"timeout_s": "60"})
    with pytest.raises(ParamsError, match=r"download\.timeout_s: found '60'"):
        load_params(path)


def test_yaml_1_2_reads_exponent_floats(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text((REPO / "params.yaml").read_text().replace("timeout_s: 60.0", "timeout_s: 6e1"))
    assert load_params(path).download.timeout_s == 60.0


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("experiment: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_check_params_exits_2_without_traceback(tmp_path):
    path = write_params(tmp_path / "p.yaml", datasets={"synthetic": {"seeed": 1}})
    result = CliRunner().invoke(app, ["check-params", "--params", str(path)])
    assert result.exit_code == 2
    assert "datasets.synthetic.seeed: unknown key (did you mean 'seed'?)" in result.output
    assert "Traceback" not in result.output


def test_check_params_accepts_committed_file():
    result = CliRunner().invoke(app, ["check-params", "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 0, result.output


def test_names_must_refer_to_defined_sections(tmp_path):
    path = write_params(
        tmp_path / "p.yaml",
        experiment={"variants": ["baseline", "mi_regg"]},
        pretrain={"cifar10": {"simclr": {"common": {"augmentation": "symetric"}}}},
    )
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert (
        "experiment.variants: 'mi_regg' is not defined under pretrain.cifar10.simclr.variants (did you mean 'mi_reg'?)"
    ) in str(error.value)
    assert (
        "pretrain.cifar10.simclr.common.augmentation: 'symetric' is not defined under augmentations (did you "
        "mean 'symmetric'?)" in str(error.value)
    )


def test_sae_topk_must_fit_the_latent_dim(tmp_path):
    path = write_params(
        tmp_path / "p.yaml", pretrain={"synthetic": {"barlow_twins": {"variants": {"sae": {"sae_topk": 5000}}}}}
    )
    with pytest.raises(
        ParamsError,
        match=r"pretrain.synthetic.barlow_twins.variants.sae: .*sae_topk \(5000\) must be "
        r"at most sae_latent_dim \(128\)",
    ):
        load_params(path)


@pytest.mark.parametrize(
    "variant, message",
    [
        ({"mi_weight": 1e-3}, "mi_weight and mi_grad_fp32 go together"),
        ({"sae_topk": 3}, "sae_latent_dim and sae_topk go together"),
        ({"levels": 1}, r"levels: found 1; Input should be greater than or equal to 2"),
        ({"mi_weigth": 1e-3}, r"mi_weigth: unknown key"),
    ],
)
def test_variant_knobs_are_checked(tmp_path, variant, message):
    path = write_params(tmp_path / "p.yaml", pretrain={"cifar10": {"simclr": {"variants": {"new": variant}}}})
    with pytest.raises(ParamsError, match=r"pretrain.cifar10.simclr.variants.new.*" + message):
        load_params(path)


SAE = {"sae_latent_dim": 64, "sae_topk": 8}


@pytest.mark.parametrize(
    "method, variant, message",
    [
        (
            "simclr",
            {"projector_layers": 0, "projector_hidden_dim": 8},
            "projector_hidden_dim: a projector of 0 linear layers has no hidden layer; remove projector_hidden_dim",
        ),
        (
            "simclr",
            {"projector_layers": 0, "projector_out_dim": 8},
            "projector_out_dim: a projector of 0 linear layers keeps its input's width",
        ),
        (
            "barlow_twins",
            {"projector_layers": 1, "projector_batch_norm": True},
            "projector_batch_norm: a projector of 1 linear layer has no hidden layer",
        ),
        (
            "simclr",
            {"projector_layers": 1, **SAE},
            "projector_layers: found 1; the sparse autoencoder replaces the "
            "projector's last two linear layers, so it needs at least 2",
        ),
        (
            "simclr",
            {"projector_hidden_dim": 8, **SAE},
            "projector_hidden_dim: a projector of 2 linear layers with a sparse autoencoder has no hidden layer",
        ),
        (
            "barlow_twins",
            {"projector_out_dim": 8, **SAE},
            "projector_out_dim: a projector of 3 linear layers with a sparse autoencoder keeps its input's width",
        ),
        ("simclr", {"projector_layers": 17}, "projector_layers: found 17; Input should be less than or equal to 16"),
        ("simclr", {"projector_batch_norm": 1}, "projector_batch_norm: found 1; Input should be a valid boolean"),
    ],
)
def test_projector_knobs_the_projector_cannot_use_are_named(tmp_path, method, variant, message):
    path = write_params(tmp_path / "p.yaml", pretrain={"cifar10": {method: {"variants": {"new": variant}}}})
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert "\n" not in str(error.value)  # one problem, one line
    assert str(error.value).startswith(f"{path}: pretrain.cifar10.{method}.variants.new.{message}")


def test_projector_knobs_combine_with_the_papers_modifications(tmp_path):
    variants = {
        "deep_bn_quantized_regularized": {
            "projector_layers": 4,
            "projector_batch_norm": True,
            "levels": 5,
            "mi_weight": 1e-3,
            "mi_grad_fp32": True,
        },
        "none": {"projector_layers": 0},
        "linear_wide": {"projector_layers": 1, "projector_out_dim": 1024},
        "sae_after_two_blocks": {"projector_layers": 4, "projector_hidden_dim": 128, **SAE},
    }
    path = write_params(tmp_path / "p.yaml", pretrain={"cifar10": {"barlow_twins": {"variants": variants}}})
    assert load_params(path).pretrain.cifar10.barlow_twins.variants["none"].projector_layers == 0


@pytest.mark.parametrize(
    "figures, message",
    [
        (
            {"bounds": {"points": ["nope"]}},
            "figures.bounds.points: 'nope' is not defined under pretrain.cifar10.simclr.variants",
        ),
        (
            {"bounds": {"points": ["linear", "mi_reg"]}},
            "figures.bounds.points: 'mi_reg' is a variant of the table, whose cells it reads; remove it",
        ),
        (
            {"bounds": {"points": ["levels_1"]}},
            "figures.ablations.points: 'levels_1' is a point of figures.bounds too; keep it in one",
        ),
        (
            {"bounds": {"dataset": "synthetic"}},
            "figures.bounds.dataset: 'synthetic' is not in experiment.datasets: "
            "a figure reads the table's untrained (and baseline) cells",
        ),
        ({"ablations": {"seeds": [5, 9]}}, "figures.ablations.seeds: [9] not in experiment.seeds"),
        (
            {"ablations": {"points": ["linear"]}},
            "figures.ablations.points: 'linear' must switch on exactly one of "
            "mi_weight (with mi_grad_fp32), levels or sae_latent_dim/sae_topk, and keep the baseline's projector",
        ),
        (
            {"ablations": {"points": ["levels_1", "levels_30"]}},
            "figures.ablations.points: 'levels_30' has levels = 30 like 'discrete'",
        ),
        (
            {"ablations": {"points": ["levels_1", "levels_1"]}},
            "figures.ablations.points: found ['levels_1', 'levels_1']; Value error, each entry may appear once",
        ),
    ],
)
def test_figure_points_must_be_buildable_beside_the_table(tmp_path, figures, message):
    variants = {"levels_30": {"levels": 30}}
    path = write_params(tmp_path / "p.yaml", figures=figures, pretrain={"cifar10": {"simclr": {"variants": variants}}})
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert message in str(error.value)


def test_figures_need_the_tables_baseline_and_empty_figures_need_nothing(tmp_path):
    path = write_params(tmp_path / "p.yaml", experiment={"variants": ["mi_reg"]})
    with pytest.raises(ParamsError, match="figures.ablations: its curves are drawn against the table's baseline: add "):
        load_params(path)
    empty = {"bounds": {"dataset": "folder", "points": []}, "ablations": {"points": []}}
    path = write_params(tmp_path / "p.yaml", experiment={"variants": ["mi_reg"]}, figures=empty)
    assert load_params(path).figures.bounds.points == []


def test_epochs_must_fit(tmp_path):
    path = write_params(
        tmp_path / "p.yaml",
        pretrain={"cifar10": {"simclr": {"common": {"warmup_epochs": 300}}}},
        linear_eval={
            "imagenet100": {"simclr": {"lr_decay_epochs": [80, 60]}},
            "cifar10": {"simclr": {"schedule": "step"}},
        },
    )
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert "pretrain.cifar10.simclr.common.warmup_epochs: found 300; must be at most epochs (200)" in str(error.value)
    assert "linear_eval.imagenet100.simclr.lr_decay_epochs: found [80, 60]; must be increasing" in str(error.value)
    assert "linear_eval.cifar10.simclr.lr_decay_epochs: empty; the step schedule needs" in str(error.value)


def test_infinite_and_nan_numbers_are_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text((REPO / "params.yaml").read_text().replace("eta: 0.02", "eta: .inf"))
    with pytest.raises(ParamsError, match=r"optimizer\.eta: found inf; Input should be a finite number"):
        load_params(path)


def test_untrained_is_a_reserved_variant_name(tmp_path):
    path = write_params(tmp_path / "p.yaml", pretrain={"synthetic": {"simclr": {"variants": {"untrained": {}}}}})
    with pytest.raises(ParamsError, match=r"pretrain.synthetic.simclr.variants.untrained: the name is reserved"):
        load_params(path)


def test_committed_params_hold_the_papers_settings(params):
    """docs/method.md sections 3-4, spot checks."""
    cifar, imagenet = params.pretrain.cifar10, params.pretrain.imagenet100
    simclr, barlow = cifar.simclr.common, cifar.barlow_twins.common
    assert (simclr.epochs, simclr.base_lr, simclr.temperature, cifar.simclr.variants["discrete"].levels) == (
        200,
        0.4,
        0.2,
        30,
    )
    assert (barlow.base_lr, barlow.classifier_lr, cifar.barlow_twins.variants["discrete"].levels) == (0.3, 0.15, 3)
    assert (imagenet.barlow_twins.common.batch_size, imagenet.simclr.common.projector_hidden_dim) == (512, 4096)
    assert (cifar.simclr.variants["mi_reg"].mi_weight, imagenet.simclr.variants["mi_reg"].mi_weight) == (1e-4, 0.01)
    assert cifar.simclr.variants["baseline"] == cifar.simclr.variants["baseline"].__class__()  # {}: nothing on
    for dataset in ("cifar10", "cifar100", "imagenet100"):  # docs/method.md 3.5: what the reference's yamls run
        for method in ("simclr", "barlow_twins"):
            sae = getattr(getattr(params.pretrain, dataset), method).variants["sae"]
            assert (sae.sae_latent_dim, sae.sae_topk) == (100_000, 1000)
    assert params.experiment.seeds == [5, 6, 7]
    assert params.augmentations["cifar_asymmetric"].view_b.solarize_p == 0.2
    assert params.augmentations["imagenet_asymmetric"].view_a.blur_p == 1.0


def billion_laughs(levels: int = 9) -> str:
    """YAML whose aliases nest: 9 levels of 9 expand to 9**9 (387 million) values from a few hundred bytes."""
    lines = ["laughs:", "  - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: p.write_text(
                billion_laughs() + (REPO / "params.yaml").read_text().replace("seeds: [5]", "seeds: *l8")
            ),
            "its YAML aliases expand to more than 100000 values",
        ),
        (lambda p: p.write_text("a: &x [1, *x]\n"), "a YAML alias refers to a value that contains it"),
        (lambda p: p.mkdir(), "is a directory; --params takes a YAML file such as params.yaml"),
        (lambda p: p.write_bytes(b"experiment:\n  seeds: [\xff\xfe]\n"), "not UTF-8 text (byte 0xff at offset 22)"),
        (lambda p: p.write_text("experiment: [unclosed\n"), "not valid YAML: "),
        (lambda p: p.write_text("[" * 5000 + "]" * 5000), "nested too deeply"),
    ],
)
def test_unreadable_params_exit_2_with_one_line(tmp_path, make, message):
    """Issue 14: a billion-laughs file ran for minutes; a directory or non-UTF-8 bytes gave a traceback."""
    path = tmp_path / "p.yaml"
    make(path)
    start = time.monotonic()
    result = CliRunner().invoke(app, ["check-params", "--params", str(path)])
    assert time.monotonic() - start < 10
    assert result.exit_code == 2 and result.output.startswith(f"error: {path}: {message}"), result.output
    assert len(result.output.splitlines()) == 1


def test_aliases_that_stay_small_are_accepted(tmp_path):
    text = (REPO / "params.yaml").read_text()
    path = tmp_path / "p.yaml"
    path.write_text(text.replace("augmentations:", "shared: &seeds [5, 6, 7]\nalso: *seeds\naugmentations:", 1))
    with pytest.raises(ParamsError, match=r"shared: unknown key"):  # parsed and validated: only the key is wrong
        load_params(path)


@pytest.mark.parametrize(
    "sections, key, suggestion",
    [
        (
            {"pretrain": {"synthetic": {"simclr": {"variants": {"mi_reg": {"mi_weigth": 1e-3}}}}}},
            "pretrain.synthetic.simclr.variants.mi_reg.mi_weigth",
            "mi_weight",
        ),
        (
            {"augmentations": {"symmetric": {"view_a": {"flip_pp": 0.5}}}},
            "augmentations.symmetric.view_a.flip_pp",
            "flip_p",
        ),
        ({"datasets": {"folder": {"rooot": None}}}, "datasets.folder.rooot", "root"),
    ],
)
def test_unknown_key_under_a_dict_suggests_the_closest(tmp_path, sections, key, suggestion):
    """Issue 20: under dict-valued sections (`variants`, `augmentations`) the message was "unknown key;
    allowed: " with an empty list and no suggestion."""
    result = CliRunner().invoke(app, ["check-params", "--params", str(write_params(tmp_path / "p.yaml", **sections))])
    assert result.exit_code == 2
    assert f"{key}: unknown key (did you mean '{suggestion}'?)" in result.output, result.output


def test_unknown_key_without_a_close_match_lists_the_allowed_keys(tmp_path):
    path = write_params(tmp_path / "p.yaml", augmentations={"symmetric": {"view_b": {"zzz": 1}}})
    with pytest.raises(
        ParamsError, match=r"view_b\.zzz: unknown key; allowed: crop_scale, crop_ratio, interpolation, "
    ):
        load_params(path)


class Leaf(Strict):
    kind: Literal["leaf"]
    alpha: int


class Other(Strict):
    kind: Literal["other"]
    beta: int


class Containers(Strict):
    """One field per container kind the key walker follows."""

    model: Leaf
    models: dict[str, Leaf]
    listed: list[Leaf]
    optional: Leaf | None
    either: Leaf | Other
    tagged: Annotated[Leaf | Other, Field(discriminator="kind")]
    nested: dict[str, list[Annotated[Leaf, Field(description="a leaf")] | None]]


LEAF = ["kind", "alpha"]


@pytest.mark.parametrize(
    "field, value, parent, allowed",
    [
        ("model", {"kind": "leaf", "alpha": 1, "typo": 1}, ("model",), LEAF),
        ("models", {"m": {"kind": "leaf", "alpha": 1, "typo": 1}}, ("models", "m"), LEAF),
        ("listed", [{"kind": "leaf", "alpha": 1}, {"kind": "leaf", "alpha": 1, "typo": 1}], ("listed", 1), LEAF),
        ("optional", {"kind": "leaf", "alpha": 1, "typo": 1}, ("optional",), LEAF),
        ("either", {"kind": "other", "beta": 1, "typo": 1}, ("either", "Other"), ["kind", "beta"]),
        ("tagged", {"kind": "other", "beta": 1, "typo": 1}, ("tagged", "other"), ["kind", "beta"]),
        ("nested", {"n": [None, {"kind": "leaf", "alpha": 1, "typo": 1}]}, ("nested", "n", 1), LEAF),
    ],
)
def test_key_walker_follows_every_container_kind(field, value, parent, allowed):
    """`_fields_at` reads the allowed keys off the annotations, whatever container holds the model (a plain
    union is reported once per member, under the member's name; a discriminated one under its tag)."""
    valid = {"kind": "leaf", "alpha": 0}
    data = {
        "model": valid,
        "models": {},
        "listed": [],
        "optional": None,
        "either": valid,
        "tagged": valid,
        "nested": {},
    }
    with pytest.raises(ValidationError) as error:
        Containers.model_validate(data | {field: value})
    assert (*parent, "typo") in [e["loc"] for e in error.value.errors() if e["type"] == "extra_forbidden"]
    assert _fields_at(Containers, parent) == allowed
