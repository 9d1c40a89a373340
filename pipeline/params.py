"""The schema of `params.yaml`: every knob, its range and its meaning.

Values live only in `params.yaml`: no field has a default here, so DVC (which reads the file, not this
schema) sees every value a stage uses. The one exception is a variant's knobs: a modification is on when
its knobs are present (DVC sees that too). The whole file is validated whenever any stage starts.
"""

import difflib
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.json_schema import JsonDict
from pydantic_core import ErrorDetails
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline.errors import ParamsError

DatasetName = Literal["cifar10", "cifar100", "imagenet100", "synthetic", "folder"]
MethodName = Literal["simclr", "barlow_twins"]
Precision = Literal["bf16", "fp32"]
UNIT_ROUNDOFF: dict[str, float] = {
    "bf16": 2.0**-8,
    "fp32": 2.0**-24,
}  # per Precision: smaller relative addends round away
UNTRAINED = "untrained"  # the variant name of the encoder before pretraining: the report's reference level
Probability = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[float, Field(gt=0)]
Md5 = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Url = Annotated[str, Field(pattern=r"^https?://\S+$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ArchiveParams(Strict):
    """An official binary archive (CIFAR): where it lives and what its bytes must hash to."""

    url: Url = Field(description="Archive URL; a mirror or a local server works the same.")
    md5: Md5 = Field(description="MD5 of the whole archive, checked before anything is extracted.")
    member_md5: dict[str, Md5] = Field(description="MD5 of extracted members by file name ({} checks none).")


class ImageTreeParams(Strict):
    """Images on the user's disk in class folders: `root/train/<class>/*`, `root/val/<class>/*` (or `test/`)."""

    root: str | None = Field(description="The tree's root folder (null: not configured).")
    jpeg_quality: int = Field(ge=1, le=100, description="JPEG quality in the .beton.")
    max_resolution: int = Field(ge=8, le=4096, description="Longest side stored, in pixels.")


class FolderParams(ImageTreeParams):
    write_mode: Literal["raw", "jpg"] = Field(description="raw pixels (small images) or JPEG.")
    train_per_class: int | None = Field(ge=1, description="Train images kept per class, a fixed choice (null: all).")
    test_per_class: int | None = Field(ge=1, description="Test images kept per class, likewise (null: all).")


class SyntheticParams(Strict):
    """The embedded dataset: small shapes and textures drawn from a seed (no network)."""

    seed: int = Field(ge=0)
    image_size: int = Field(ge=8, le=64, description="Side of the square images, pixels.")
    num_classes: int = Field(ge=2, le=20)
    train_per_class: int = Field(ge=1, le=100_000)
    test_per_class: int = Field(ge=1, le=100_000)


class DatasetsParams(Strict):
    cifar10: ArchiveParams
    cifar100: ArchiveParams
    imagenet100: ImageTreeParams
    synthetic: SyntheticParams
    folder: FolderParams


class DownloadParams(Strict):
    retries: int = Field(ge=0, le=100, description="Attempts after the first, resuming each time.")
    timeout_s: float = Field(gt=0, le=3600, description="Socket timeout per read, seconds.")


class ExperimentParams(Strict):
    """Which cells `dvc repro` builds: the lists of the DVC foreach/matrix (dataset × method × variant × seed)."""

    datasets: list[DatasetName] = Field(min_length=1)
    methods: list[MethodName] = Field(min_length=1)
    variants: list[str] = Field(min_length=1, description="Names defined under `pretrain.<dataset>.<method>.variants`.")
    seeds: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)

    @field_validator("datasets", "methods", "variants", "seeds")
    @classmethod
    def _unique(cls, names: list) -> list:
        return _each_once(names)


def _each_once(names: list) -> list:
    if len(set(names)) != len(names):
        raise ValueError("each entry may appear once")
    return names


class ViewParams(Strict):
    crop_scale: list[Probability] = Field(min_length=2, max_length=2, description="RandomResizedCrop area range.")
    crop_ratio: list[Positive] = Field(min_length=2, max_length=2, description="RandomResizedCrop aspect range.")
    interpolation: Literal["bicubic", "bilinear"]
    flip_p: Probability
    jitter: list[Annotated[float, Field(ge=0)]] = Field(
        min_length=4, max_length=4, description="Colour jitter strengths: brightness, contrast, saturation, hue."
    )
    jitter_p: Probability
    grayscale_p: Probability
    blur_p: Probability
    blur_sigma: list[Positive] = Field(min_length=2, max_length=2)
    solarize_p: Probability


class AugmentationParams(Strict):
    """The two views' augmentations (symmetric when both are equal), docs/method.md section 4."""

    view_a: ViewParams
    view_b: ViewParams


class CommonParams(Strict):
    """What every variant of one method on one dataset shares: one row of docs/method.md section 4's table."""

    epochs: int = Field(ge=1, le=10_000)
    warmup_epochs: int = Field(ge=0, description="Linear warmup before the cosine decay.")
    batch_size: int = Field(ge=2, le=65_536, description="Global batch (all GPUs together).")
    base_lr: Positive = Field(description="LARS lr for batch 256; scaled by batch_size / 256.")
    classifier_lr: Positive = Field(description="Online classifier lr for batch 256; scaled likewise.")
    weight_decay: Annotated[float, Field(ge=0)]
    augmentation: str = Field(description="A name defined under `augmentations`.")
    backbone_width: int = Field(ge=1, le=256, description="ResNet-18 base width: 64 is the paper's.")
    projector_hidden_dim: int = Field(ge=1, le=65_536)
    projector_out_dim: int = Field(ge=1, le=65_536)
    renyi_alpha: int = Field(
        ge=2,
        le=8,
        description="α of the matrix Rényi entropy (the regularizer and the logged I(Z1;Z2) of every variant).",
    )


class SimclrCommon(CommonParams):
    temperature: Positive = Field(description="τ of NT-Xent.")


class BarlowTwinsCommon(CommonParams):
    offdiag_weight: Positive = Field(description="λ_BT, the off-diagonal weight.")
    loss_scale: Positive


BASELINE_HEADS: dict[str, tuple[int, bool]] = {
    "simclr": (2, False),
    "barlow_twins": (3, True),
}  # per method: the baseline projector's linear layers and whether it has batch norm (docs/method.md 3.6)


class VariantParams(Strict):
    """One variant: the paper's projector modifications it switches on, each on when its knobs are given
    (docs/method.md section 1; any combination), and the projector's shape where it departs from the method's
    baseline head (docs/method.md 3.6). `{}` is the baseline.

    The projector is (Linear–[BN]–ReLU) × (layers − 1), then Linear to the output width; 1 layer is a linear
    projector, 0 none (z = h). A sparse autoencoder replaces its last two linear layers (it is two linear layers,
    its latents the hidden layer): it acts on the output of the blocks before them, the features with 2 layers,
    and its output has its input's width."""

    mi_weight: Positive | None = Field(None, description="λ: add λ · I(Z1;Z2) to the loss (docs/method.md 3.3).")
    mi_grad_fp32: bool | None = Field(
        None,
        description=(
            "Under bf16, give λ·I(Z1;Z2) its own backward pass so that its gradient is added to the SSL gradient "
            "in fp32 (the weights' .grad) instead of being rounded away where the two meet in bf16 tensors; one "
            "more backward pass per step. false: one backward of the summed loss, as the reference code."
        ),
    )
    levels: int | None = Field(None, ge=2, le=1000, description="L: quantize the projector output to L values (3.4).")
    sae_latent_dim: int | None = Field(None, ge=1, le=1_000_000, description="d: sparse-autoencoder projector (3.5).")
    sae_topk: int | None = Field(None, ge=1, description="k: latents the sparse autoencoder keeps per sample.")
    projector_layers: int | None = Field(
        None,
        ge=0,
        le=16,
        description="Linear layers of the projector (default: the method's, SimCLR 2, Barlow Twins 3).",
    )
    projector_hidden_dim: int | None = Field(None, ge=1, le=65_536, description="Its hidden width (default: common's).")
    projector_out_dim: int | None = Field(None, ge=1, le=65_536, description="Its output width (default: common's).")
    projector_batch_norm: bool | None = Field(
        None, description="Batch norm after each hidden layer (default: the method's, SimCLR no, Barlow Twins yes)."
    )

    def ablated(self) -> tuple[str, float] | None:
        """For Fig. 4: the one knob this variant switches on and its value, ("mi_weight", λ), ("levels", L) or
        ("sae_sparsity", k / d); None if it switches on another number of them or shapes its projector."""
        shaped = any(
            getattr(self, name) is not None for name in type(self).model_fields if name.startswith("projector_")
        )
        sparsity = self.sae_topk / self.sae_latent_dim if self.sae_topk and self.sae_latent_dim else None
        knobs = [
            (k, float(v))
            for k, v in (("mi_weight", self.mi_weight), ("levels", self.levels), ("sae_sparsity", sparsity))
            if v is not None
        ]
        return knobs[0] if len(knobs) == 1 and not shaped else None

    @model_validator(mode="after")
    def _knobs_come_together(self) -> "VariantParams":
        if (self.mi_weight is None) != (self.mi_grad_fp32 is None):
            raise ValueError("mi_weight and mi_grad_fp32 go together (the MI regularizer's two knobs)")
        if (self.sae_latent_dim is None) != (self.sae_topk is None):
            raise ValueError("sae_latent_dim and sae_topk go together (the sparse autoencoder's two knobs)")
        if self.sae_topk is not None and self.sae_latent_dim is not None and self.sae_topk > self.sae_latent_dim:
            raise ValueError(f"sae_topk ({self.sae_topk}) must be at most sae_latent_dim ({self.sae_latent_dim})")
        return self


class SimclrCell(Strict):
    common: SimclrCommon
    variants: dict[str, VariantParams] = Field(min_length=1)


class BarlowTwinsCell(Strict):
    common: BarlowTwinsCommon
    variants: dict[str, VariantParams] = Field(min_length=1)


class MethodsParams(Strict):
    simclr: SimclrCell
    barlow_twins: BarlowTwinsCell


class PretrainParams(Strict):
    """Per dataset and method: the shared settings (`common`) and each variant's own knobs (`variants`), so
    that a variant's stages depend on its own knobs only."""

    cifar10: MethodsParams
    cifar100: MethodsParams
    imagenet100: MethodsParams
    synthetic: MethodsParams
    folder: MethodsParams


class OptimizerParams(Strict):
    """LARS and the warmup (docs/method.md section 4), for pretraining and the linear evaluations that use them."""

    momentum: Probability = Field(description="Momentum of LARS and SGD.")
    eta: Positive = Field(description="LARS trust coefficient.")
    clip_lr: bool
    exclude_bias_n_norm: bool = Field(description="1-D parameters take plain momentum steps without weight decay.")
    warmup_start_lr: Annotated[float, Field(ge=0)] = Field(description="Where warmup-cosine schedules start.")


CHANGES_NUMBERS: JsonDict = {"changes_numbers": True}  # can change results: a DVC param of the stages reading it
SAME_NUMBERS: JsonDict = {"changes_numbers": False}  # speed only: every number is the same whatever its value


class TrainingParams(Strict):
    """How training runs, not the method. Each field's schema says whether it can change numbers (rounding):
    those that can are DVC params of the stages that read them (tests/test_dvc_yaml.py checks it)."""

    precision: Precision = Field(
        description="Autocast dtype on CUDA (CPU runs fp32). Changes numbers on CUDA.",
        json_schema_extra=CHANGES_NUMBERS,
    )
    channels_last: bool = Field(
        description="NHWC activations on CUDA (faster convolutions, other kernels). Changes numbers on CUDA.",
        json_schema_extra=CHANGES_NUMBERS,
    )
    compile: bool = Field(
        description="torch.compile the model (fused kernels round differently). Changes numbers.",
        json_schema_extra=CHANGES_NUMBERS,
    )
    torch_threads: int = Field(
        ge=1,
        description=(
            "torch's intra-op CPU threads: CPU training, and the CPU side of evaluations (kNN) everywhere. Changes "
            "numbers (oneDNN and ATen split reductions by thread), so it is set here, not from the CPUs a process gets."
        ),
        json_schema_extra=CHANGES_NUMBERS,
    )
    loader_workers: int = Field(
        ge=-1,
        description=(
            "FFCV decoding threads (-1: this process's share of the CPUs it may use, divided among torchrun's "
            "processes). Speed only: sample order and augmentation draws depend on the seed and the sample (but "
            "imagenet100's crops, made by FFCV's decoder, are not seeded at all)."
        ),
        json_schema_extra=SAME_NUMBERS,
    )
    eval_batch_size: int = Field(
        ge=1,
        description="Batch of the online classifier's test pass. Changes numbers (kernels and rounding vary by batch).",
        json_schema_extra=CHANGES_NUMBERS,
    )


class FitParams(Strict):
    """Training a classifier: optimizer and schedule (docs/method.md 4.1)."""

    epochs: int = Field(ge=1, le=10_000)
    batch_size: int = Field(ge=1, le=65_536)
    optimizer: Literal["sgd", "lars"]
    base_lr: Positive = Field(description="lr for batch 256; scaled by batch_size / 256 (as solo-learn).")
    weight_decay: Annotated[float, Field(ge=0)]
    schedule: Literal["warmup_cosine", "step"] = Field(
        description="warmup-cosine per step, or ×0.1 at each of `lr_decay_epochs`."
    )
    warmup_epochs: int = Field(ge=0, description="Linear warmup before the cosine (warmup_cosine).")
    lr_decay_epochs: list[Annotated[int, Field(ge=1)]] = Field(description="Epochs where the lr drops ×0.1 (step).")


class ProtocolParams(FitParams):
    """The paper's linear evaluation of one method on one dataset (docs/method.md 4.1)."""

    protocol: Literal["finetune", "augmented", "features"] = Field(
        description=(
            "finetune: backbone and classifier trained on random crops + flips (the reference's default); "
            "augmented: frozen backbone (eval mode), classifier on random crops + flips; "
            "features: classifier on features of the plain train images, computed once."
        )
    )
    crop_scale: list[Probability] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="This dataset and method's crop area range, instead of linear_eval.view's (null: view's).",
    )


class EvalMethods(Strict):
    simclr: ProtocolParams
    barlow_twins: ProtocolParams


class KnnParams(Strict):
    k: int = Field(ge=1, description="Neighbours that vote.")
    temperature: Positive = Field(description="T of the vote weights exp(cos / T).")


class LinearEvalParams(Strict):
    """Evaluation of the encoder features h: the paper's protocol per dataset and method, and two extra
    columns researchers compare across papers: a fast frozen probe (`probe`, on precomputed features of the
    plain train images) and a weighted kNN (`knn`)."""

    view: ViewParams = Field(description="Train-time augmentation of the finetune and augmented protocols.")
    knn: KnnParams
    probe: FitParams
    cifar10: EvalMethods
    cifar100: EvalMethods
    imagenet100: EvalMethods
    synthetic: EvalMethods
    folder: EvalMethods


class FigureParams(Strict):
    """One figure's own cells: its `points` (variants defined under `pretrain.<dataset>.<method>.variants` that
    `experiment` does not build) × its `seeds`. It also reads the table's cells of its dataset, method and seeds:
    the table's variants and the untrained encoder."""

    dataset: DatasetName = Field(description="One of experiment.datasets.")
    method: MethodName = Field(description="One of experiment.methods.")
    seeds: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, description="Some of experiment.seeds.")
    points: list[str] = Field(description="Variant names, each its own cells; []: no figure.")

    @field_validator("seeds", "points")
    @classmethod
    def _unique(cls, names: list) -> list:
        return _each_once(names)


class FiguresParams(Strict):
    """The paper's figures beyond its tables: the cells each adds to `experiment`'s (docs/method.md §8)."""

    bounds: FigureParams = Field(description="Fig. 3: the final bounds against top-1, a point per projector.")
    ablations: FigureParams = Field(
        description="Fig. 4 (c)-(e): top-1 against λ, L and k/d; each point switches on one of them alone."
    )


class Params(Strict):
    experiment: ExperimentParams
    figures: FiguresParams
    download: DownloadParams
    datasets: DatasetsParams
    augmentations: dict[str, AugmentationParams]
    optimizer: OptimizerParams
    training: TrainingParams
    pretrain: PretrainParams
    linear_eval: LinearEvalParams


def _cross_check(params: Params) -> list[str]:
    """Problems that span keys: names that must exist elsewhere, sizes and epochs that must fit."""
    problems = []
    experiment = params.experiment
    for dataset in PretrainParams.model_fields:
        for method in MethodsParams.model_fields:
            cell, key = getattr(getattr(params.pretrain, dataset), method), f"pretrain.{dataset}.{method}"
            if cell.common.augmentation not in params.augmentations:
                problems.append(
                    f"{key}.common.augmentation: {cell.common.augmentation!r} is not defined under "
                    f"augmentations{_did_you_mean(cell.common.augmentation, list(params.augmentations))}"
                )
            problems += _warmup_fits(f"{key}.common", cell.common.warmup_epochs, cell.common.epochs)
            problems += [
                f"{key}.variants.{name}: the name is reserved for the report's untrained encoder"
                for name in cell.variants
                if name == UNTRAINED
            ]
            problems += [
                p for name, v in cell.variants.items() for p in _projector_fits(f"{key}.variants.{name}", v, method)
            ]
            if dataset in experiment.datasets and method in experiment.methods:
                problems += [
                    f"experiment.variants: {name!r} is not defined under {key}.variants"
                    f"{_did_you_mean(name, list(cell.variants))}"
                    for name in experiment.variants
                    if name not in cell.variants
                ]
            fit = getattr(getattr(params.linear_eval, dataset), method)
            problems += _fit_fits(f"linear_eval.{dataset}.{method}", fit)
    return problems + _fit_fits("linear_eval.probe", params.linear_eval.probe) + _figures_fit(params)


def _figures_fit(params: Params) -> list[str]:
    """A figure adds cells beside the table's: variants that are defined and that neither the table nor the other
    figure builds (two stages cannot write one cell), in a dataset, method and seeds of the table, whose untrained
    (and baseline) cells it reads. Fig. 4's points each switch on one knob."""
    problems: list[str] = []
    built: dict[tuple[str, str, str], str] = {}  # (dataset, method, point) -> the figure that builds it
    for name in FiguresParams.model_fields:
        figure, key = getattr(params.figures, name), f"figures.{name}"
        if not figure.points:
            continue
        for field, value in (("datasets", figure.dataset), ("methods", figure.method)):
            if value not in getattr(params.experiment, field):
                problems.append(f"{key}.{field[:-1]}: {value!r} is not in experiment.{field}: {READS_THE_TABLE}")
        if missing := [seed for seed in figure.seeds if seed not in params.experiment.seeds]:
            problems.append(f"{key}.seeds: {missing} not in experiment.seeds: {READS_THE_TABLE}")
        variants = getattr(getattr(params.pretrain, figure.dataset), figure.method).variants
        for point in figure.points:
            other = built.setdefault((figure.dataset, figure.method, point), name)
            if point not in variants:
                problems.append(
                    f"{key}.points: {point!r} is not defined under pretrain.{figure.dataset}.{figure.method}."
                    f"variants{_did_you_mean(point, list(variants))}"
                )
            elif point in params.experiment.variants:
                problems.append(f"{key}.points: {point!r} is a variant of the table, whose cells it reads; remove it")
            elif other != name:
                problems.append(f"{key}.points: {point!r} is a point of figures.{other} too; keep it in one")
    return problems + _ablations_fit(params)


READS_THE_TABLE = "a figure reads the table's untrained (and baseline) cells of its dataset, method and seeds"


def _ablations_fit(params: Params) -> list[str]:
    """Fig. 4's points switch on one knob each, one value per point; its curves need the table's baseline."""
    figure = params.figures.ablations
    if not figure.points:
        return []
    problems = [] if "baseline" in params.experiment.variants else [f"figures.ablations: {NEEDS_BASELINE}"]
    variants = getattr(getattr(params.pretrain, figure.dataset), figure.method).variants
    seen: dict[tuple[str, float], str] = {}
    for name in [v for v in params.experiment.variants if v in variants] + figure.points:
        knob = variants[name].ablated() if name in variants else None
        if knob is None and name in figure.points and name in variants:
            problems.append(f"figures.ablations.points: {name!r} {ONE_KNOB}")
        elif knob and (twin := seen.setdefault(knob, name)) != name:
            problems.append(f"figures.ablations.points: {name!r} has {knob[0]} = {knob[1]:g} like {twin!r}")
    return problems


NEEDS_BASELINE = "its curves are drawn against the table's baseline: add 'baseline' to experiment.variants"
ONE_KNOB = (
    "must switch on exactly one of mi_weight (with mi_grad_fp32), levels or sae_latent_dim/sae_topk, and keep the "
    "baseline's projector"
)


def _projector_fits(key: str, knobs: VariantParams, method: str) -> list[str]:
    """Projector knobs a variant gives that its projector has no use for (its shape: VariantParams)."""
    layers = BASELINE_HEADS[method][0] if knobs.projector_layers is None else knobs.projector_layers
    sae = knobs.sae_latent_dim is not None
    if sae and layers < 2:
        return [
            f"{key}.projector_layers: found {layers}; the sparse autoencoder replaces the projector's last two "
            "linear layers, so it needs at least 2"
        ]
    shape = f"a projector of {layers} linear layer{'s' if layers != 1 else ''}" + (
        " with a sparse autoencoder" if sae else ""
    )
    hidden = layers - 2 if sae else layers - 1
    unused = {
        "projector_hidden_dim": (hidden <= 0, "has no hidden layer"),
        "projector_batch_norm": (hidden <= 0, "has no hidden layer"),
        "projector_out_dim": (sae or layers == 0, "keeps its input's width"),
    }
    return [
        f"{key}.{name}: {shape} {why}; remove {name}"
        for name, (refused, why) in unused.items()
        if refused and getattr(knobs, name) is not None
    ]


def _warmup_fits(key: str, warmup_epochs: int, epochs: int) -> list[str]:
    if warmup_epochs > epochs:
        return [f"{key}.warmup_epochs: found {warmup_epochs}; must be at most epochs ({epochs})"]
    return []


def _fit_fits(key: str, fit: FitParams) -> list[str]:
    problems = _warmup_fits(key, fit.warmup_epochs, fit.epochs)
    if fit.lr_decay_epochs != sorted(set(fit.lr_decay_epochs)) or any(e >= fit.epochs for e in fit.lr_decay_epochs):
        problems.append(
            f"{key}.lr_decay_epochs: found {fit.lr_decay_epochs}; must be increasing and below epochs ({fit.epochs})"
        )
    if fit.schedule == "step" and not fit.lr_decay_epochs:
        problems.append(f"{key}.lr_decay_epochs: empty; the step schedule needs at least one epoch to decay at")
    return problems


MAX_PARAMS_BYTES = 1 << 20  # the committed params.yaml is about 10 kB
MAX_PARAMS_VALUES = 100_000  # values once YAML aliases are expanded; the committed file has about 400


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read `path` with ruamel (YAML 1.2, as DVC does) and validate the whole file."""
    path = Path(path)
    try:
        data = YAML(typ="safe", pure=True).load(_read_text(path))
    except YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ParamsError(f"{path}: nested too deeply to be a params file") from None
    _refuse_alias_bombs(path, data)
    try:
        params = Params.model_validate(data)
    except ValidationError as e:
        _fail(path, [_describe(err) for err in e.errors()])
    if problems := _cross_check(params):
        _fail(path, problems)
    return params


def _read_text(path: Path) -> str:
    """The file's text: UTF-8, at most MAX_PARAMS_BYTES; a ParamsError naming `path` otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PARAMS_BYTES + 1)
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ParamsError(f"{path}: is a directory; --params takes a YAML file such as params.yaml") from None
    except OSError as e:
        raise ParamsError(f"{path}: cannot be read ({e.strerror})") from None
    if len(raw) > MAX_PARAMS_BYTES:
        raise ParamsError(f"{path}: larger than {MAX_PARAMS_BYTES} bytes; a params file is a few kB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParamsError(
            f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None


def _refuse_alias_bombs(path: Path, data: object) -> None:
    """Refuse YAML whose aliases expand to more than MAX_PARAMS_VALUES values ("billion laughs"), or refer
    to themselves, before validation walks the expanded tree. Linear in the document: shared nodes
    (one anchor, many aliases) are sized once."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: object) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise ParamsError(f"{path}: a YAML alias refers to a value that contains it (a cycle)")
        open_nodes.add(id(node))
        total = 1 + sum(size(child) for child in (node.values() if isinstance(node, dict) else node))
        if total > MAX_PARAMS_VALUES:
            raise ParamsError(
                f"{path}: its YAML aliases expand to more than {MAX_PARAMS_VALUES} values; "
                "write the values out instead of nesting aliases"
            )
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    size(data)


def _fail(path: Path, problems: list[str]):
    """Raise one ParamsError: the first problem on the first line (what a CI log shows), then all of them."""
    first = f"{path}: {problems[0]}"
    if len(problems) == 1:
        raise ParamsError(first) from None
    more = len(problems) - 1
    raise ParamsError(
        f"{first} (and {more} more problem{'s' if more > 1 else ''})\n  " + "\n  ".join(problems)
    ) from None


def _describe(err: ErrorDetails) -> str:
    """One line per problem: key path, what was found, what is allowed."""
    loc = err["loc"]
    key = ".".join(str(part) for part in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        known = _fields_at(Params, loc[:-1])
        hint = _did_you_mean(str(loc[-1]), known)
        return f"{key}: unknown key{hint}" if hint else f"{key}: unknown key; allowed: {', '.join(known)}"
    if err["type"] == "missing":
        return f"{key}: missing"
    hint = ""
    if err["type"] == "literal_error" and isinstance(err["input"], str):
        hint = _did_you_mean(err["input"], re.findall(r"'([^']*)'", err["ctx"]["expected"]))
    found = repr(err["input"])
    return f"{key}: found {found if len(found) < 80 else found[:77] + '...'}; {err['msg']}{hint}"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at `loc`, a pydantic error location under `model`, read off the annotations: a
    model's fields, a dict's values, a list's items, an optional value, the union member that pydantic names
    in the location (by class name, or by discriminator tag). Empty where no single model is found."""
    annotation: object = model
    for part in loc:
        members = _members(annotation)
        if len(members) > 1:  # pydantic's location names the member that was tried
            members = [m for m in members if part == getattr(m, "__name__", None) or part in _tags(m)]
            annotation = members[0] if members else None
            continue
        kind = members[0]
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            field = kind.model_fields.get(part) if isinstance(part, str) else None
            annotation = field.annotation if field else None
        elif get_origin(kind) in (dict, list):
            annotation = get_args(kind)[-1]  # the values of a dict, the items of a list
        else:
            return []
    models = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    return list(models[0].model_fields) if len(models) == 1 else []


def _members(annotation: object) -> list:
    """`annotation` without its Annotated metadata, as the list of its union members other than None."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, UnionType):
        return [member for arg in get_args(annotation) if arg is not type(None) for member in _members(arg)]
    return [annotation]


def _tags(member: object) -> set:
    """The Literal values of a model's fields: a discriminated union's tags are among them."""
    if not (isinstance(member, type) and issubclass(member, BaseModel)):
        return set()
    return {
        value
        for f in member.model_fields.values()
        if get_origin(f.annotation) is Literal
        for value in get_args(f.annotation)
    }


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
