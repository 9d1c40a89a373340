"""The `export` command: a pretrained encoder out of the pipeline, as safetensors (docs/usage.md)."""

import logging
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger(__name__)


def export(
    checkpoint: Annotated[
        Path,
        typer.Option(help="A pretraining run's checkpoint.pt, e.g. runs/cifar10/simclr/baseline/seed0/checkpoint.pt."),
    ],
    out: Annotated[Path, typer.Option(help="The .safetensors file to write: the encoder's tensors and metadata.")],
) -> None:
    """Write a pretrained encoder as safetensors (no pickle) in torchvision's resnet18 key layout, with its cell,
    stem, width and normalization in the metadata; `pipeline.export.load_encoder` reads it back."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.errors import UserError
    from pipeline.export import encoder_from_checkpoint, save_encoder

    if out.is_dir():
        raise UserError(f"--out {out}: a folder; give the path of the .safetensors file to write")
    state = load_checkpoint(checkpoint, "pass the checkpoint.pt a pretraining run wrote")
    tensors, metadata = encoder_from_checkpoint(state, checkpoint)
    if metadata.epoch < metadata.epochs:
        log.warning("%s: an unfinished run, exported after epoch %d of %d", checkpoint, metadata.epoch, metadata.epochs)
    save_encoder(tensors, metadata, out)
    typer.echo(
        f"{out}: the {metadata.dataset} {metadata.method} {metadata.variant} seed {metadata.seed} encoder "
        f"(ResNet-18, width {metadata.width}, {metadata.stem} stem, {8 * metadata.width} features)"
    )
