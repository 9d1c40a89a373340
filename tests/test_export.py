"""Encoders out of the pipeline (issue 21): `export` writes safetensors that `load_encoder` and torchvision's
`resnet18` read back to the same features, and a damaged or edited file is refused in one line.

Features are compared with `torch.equal`: both sides run the same operations in the same order on the same
tensors (the ResNet-18 of pipeline.backbones is torchvision's, module for module), so not even rounding differs.
"""

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from pipeline.backbones import resnet18
from pipeline.checkpoint import load_checkpoint
from pipeline.errors import UserError
from pipeline.export import EncoderMetadata, encoder_from_checkpoint, load_encoder, save_encoder
from pipeline.linear_eval import load_backbone
from pipeline.metrics import DatasetMetrics
from pipeline.params import load_params
from pipeline.pretrain import pretrain
from pipeline.run import make_run
from stages.cli import app
from tests.helpers import tiny_params

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """A tiny SimCLR cell pretrained for 3 epochs: (its run, its checkpoint.pt)."""
    root = tmp_path_factory.mktemp("trained")
    params = load_params(tiny_params(root / "params.yaml"))
    meta = DatasetMetrics.model_validate_json((tiny_dataset / "meta.json").read_text())
    run = make_run(params, "synthetic", "simclr", "baseline", 0, meta, CPU)
    pretrain(run, params.training, tiny_dataset / "ffcv", root / "run", CPU, "test-version")
    return run, root / "run" / "checkpoint.pt"


def features(encoder: nn.Module, side: int) -> torch.Tensor:
    with torch.no_grad():
        return encoder.eval()(torch.randn(4, 3, side, side, generator=torch.Generator().manual_seed(0)))


def export(checkpoint: Path, out: Path):
    return CliRunner().invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(out)])


def test_export_then_load_gives_the_checkpoints_features_and_cell(trained, tmp_path):
    run, checkpoint = trained
    result = export(checkpoint, tmp_path / "encoder.safetensors")
    assert result.exit_code == 0, result.output
    encoder, metadata = load_encoder(tmp_path / "encoder.safetensors")
    assert not encoder.training
    assert torch.equal(features(encoder, 16), features(load_backbone(run, checkpoint), 16))  # BN statistics too
    assert (metadata.dataset, metadata.method, metadata.variant, metadata.seed) == (
        "synthetic",
        "simclr",
        "baseline",
        0,
    )
    assert (metadata.stem, metadata.width, metadata.image_size) == (run.stem, 4, run.crop_size)
    assert (metadata.mean, metadata.std) == (run.mean, run.std) and metadata.code_version == "test-version"
    assert (metadata.epoch, metadata.epochs) == (3, 3)


def test_an_unfinished_run_is_exported_with_a_warning(trained, tmp_path):
    state = load_checkpoint(trained[1], "")
    torch.save(state | {"epoch": 1}, tmp_path / "checkpoint.pt")
    result = export(tmp_path / "checkpoint.pt", tmp_path / "e.safetensors")
    assert result.exit_code == 0 and "an unfinished run, exported after epoch 1 of 3" in result.output, result.output
    assert load_encoder(tmp_path / "e.safetensors")[1].epoch == 1


def test_channels_last_weights_are_exported(trained, tmp_path):
    """A GPU run with training.channels_last saves strided 4-d weights; safetensors stores dense tensors only."""
    run, checkpoint = trained
    state = load_checkpoint(checkpoint, "")
    state["model"] = {
        k: v.to(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in state["model"].items()
    }
    save_encoder(*encoder_from_checkpoint(state, checkpoint), tmp_path / "e.safetensors")
    assert torch.equal(
        features(load_encoder(tmp_path / "e.safetensors")[0], 16), features(load_backbone(run, checkpoint), 16)
    )


def metadata_for(stem: str, width: int = 64) -> EncoderMetadata:
    return EncoderMetadata.model_validate(
        {
            "format": "projector-ib-encoder/1",
            "dataset": "cifar10" if stem == "cifar" else "imagenet100",
            "method": "simclr",
            "variant": "baseline",
            "seed": "0",
            "epoch": "200",
            "epochs": "200",
            "stem": stem,
            "width": str(width),
            "image_size": "32" if stem == "cifar" else "224",
            "mean": "[0.5, 0.5, 0.5]",
            "std": "[0.25, 0.25, 0.25]",
            "code_version": "v",
        }
    )


def encoder_file(path: Path, stem: str, width: int = 64) -> tuple[nn.Module, Path]:
    """A width-`width` encoder with random weights and BatchNorm statistics, exported to `path`."""
    torch.manual_seed(1)
    encoder = resnet18(stem, width)
    for module in encoder.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1), module.running_var.uniform_(0.5, 2.0)
    save_encoder(encoder.state_dict(), metadata_for(stem, width), path)
    return encoder, path


@pytest.mark.parametrize("stem, side", [("cifar", 32), ("imagenet", 64)])
def test_torchvision_resnet18_loads_the_export(tmp_path, stem, side):
    """As docs/usage.md says: `fc` replaced by the identity, and for the CIFAR stem, conv1 and maxpool."""
    encoder, path = encoder_file(tmp_path / "e.safetensors", stem)
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Identity()
    if stem == "cifar":
        model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 2, bias=False), nn.Identity()
    model.load_state_dict(load_file(path), strict=True)
    assert torch.equal(features(model, side), features(load_encoder(path)[0], side))
    assert torch.equal(features(model, side), features(encoder, side))


def edit_header(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)  # the header's length is unchanged
    path.write_bytes(data.replace(old, new))


def damage(path: Path, how: str) -> None:
    """`path` (an intact export of a width-64 encoder) changed as someone or something might change it."""
    data = path.read_bytes()
    if how == "a weight's byte":
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    elif how == "a metadata value":
        edit_header(path, b'"seed":"0"', b'"seed":"1"')
    elif how == "the header's JSON":
        edit_header(path, b'"__metadata__":{', b'"__metadata__":[')
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "no metadata":
        save_file(load_file(path), path)
    elif how == "wrong shapes":  # written through save_encoder: its sum is right, its tensors are not
        save_encoder(resnet18("cifar", 8).state_dict(), metadata_for("cifar", 64), path)
    elif how == "wrong dtype":
        save_encoder({k: v.double() for k, v in load_file(path).items()}, metadata_for("cifar"), path)
    elif how == "a later format":  # model_copy does not validate: the writer of a format this code cannot read
        later = metadata_for("cifar").model_copy(update={"format": "projector-ib-encoder/2"})
        save_encoder(load_file(path), later, path)


@pytest.mark.parametrize(
    "how, message",
    [
        ("a weight's byte", "changed after export (sha256 of its metadata and tensors differs); export it again"),
        ("a metadata value", "changed after export (sha256 of its metadata and tensors differs); export it again"),
        ("the header's JSON", "not a safetensors file (Error while deserializing header: invalid JSON in header"),
        ("truncated", "not a safetensors file (Error while deserializing header: "),
        ("empty", "not a safetensors file (Error while deserializing header: header too small)"),
        ("no metadata", "not an encoder written by `python -m stages export` (no format, dataset, method, "),
        (
            "wrong shapes",
            "do not make the width-64 ResNet-18 with the cifar stem its metadata describes (conv1.weight ",
        ),
        (
            "wrong dtype",
            "(conv1.weight is torch.float64 [64, 3, 3, 3], expected torch.float32 [64, 3, 3, 3] and ",
        ),
        (
            "a later format",
            "its metadata does not describe an encoder (format: Input should be 'projector-ib-encoder/1')",
        ),
    ],
)
def test_a_damaged_or_edited_file_is_refused_in_one_line(tmp_path, how, message):
    path = encoder_file(tmp_path / "e.safetensors", "cifar")[1]
    damage(path, how)
    with pytest.raises(UserError) as error:
        load_encoder(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


def test_export_refuses_a_checkpoint_without_a_run_config(tmp_path):
    torch.save({"model": {"backbone.conv1.weight": torch.zeros(4, 3, 3, 3)}, "epoch": 1}, tmp_path / "c.pt")
    result = export(tmp_path / "c.pt", tmp_path / "e.safetensors")
    assert result.exit_code == 1 and not (tmp_path / "e.safetensors").exists()
    message = "not a pretraining checkpoint of this pipeline (no 'config')"
    assert result.output == f"error: {tmp_path / 'c.pt'}: {message}; pass the checkpoint.pt a pretraining run wrote\n"


def test_the_header_holds_the_metadata_as_strings(tmp_path):
    path = encoder_file(tmp_path / "e.safetensors", "imagenet")[1]
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])["__metadata__"]
    assert header["stem"] == "imagenet" and header["width"] == "64" and json.loads(header["mean"]) == [0.5, 0.5, 0.5]
    assert len(header["sha256"]) == 64


def test_export_refuses_a_folder_as_out(trained, tmp_path):
    result = export(trained[1], tmp_path)
    assert (
        result.exit_code == 1
        and result.output == f"error: --out {tmp_path}: a folder; give the path of the .safetensors file to write\n"
    )
