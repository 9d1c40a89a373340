"""Data stages: `prepare` (download / generate / index, then verify) and `convert` (to FFCV)."""

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from pipeline.atomic import atomic_file, check_output
from pipeline.errors import UserError
from pipeline.params import load_params
from stages.common import PARAMS_FILE, Dataset, ParamsFile

log = logging.getLogger(__name__)


def prepare(
    dataset: Dataset,
    out: Annotated[Path, typer.Option(help="Folder to write the verified raw files to.")],
    downloads: Annotated[
        Path | None,
        typer.Option(
            help="Archive cache (CIFAR only): partial downloads resume from here, and an archive placed "
            "here with the right MD5 is used without a download."
        ),
    ] = None,
    params_file: ParamsFile = PARAMS_FILE,
) -> None:
    """Get a dataset's raw files: download and verify (CIFAR), generate (synthetic) or index (image trees)."""
    from pipeline.datasets import get_dataset

    params = load_params(params_file)
    spec = get_dataset(dataset)
    if spec.downloads:
        if downloads is None:
            raise UserError(f"--downloads is required for {dataset}: the folder where its archive is cached")
        check_output(downloads, folder=True)
    check_output(out, folder=True)
    spec.prepare(params, out, downloads)
    log.info("prepared %s in %s", dataset, out)


def convert(
    dataset: Dataset,
    raw: Annotated[Path, typer.Option(help="The folder `prepare` wrote.")],
    out: Annotated[Path, typer.Option(help="Folder for train.beton and test.beton.")],
    metadata: Annotated[
        Path, typer.Option(help="JSON file to write: class counts, image shape, pixel statistics, checksums.")
    ],
    params_file: ParamsFile = PARAMS_FILE,
) -> None:
    """Convert the train and test splits to FFCV .beton files and describe them."""
    from pipeline.beton import convert_dataset
    from pipeline.datasets import get_dataset

    params = load_params(params_file)
    get_dataset(dataset)  # a wrong name first, then the files
    check_output(out, folder=True)
    check_output(metadata)
    meta = convert_dataset(dataset, params, raw, out)
    with atomic_file(metadata) as staging:
        staging.write_text(json.dumps(meta, indent=2) + "\n")
