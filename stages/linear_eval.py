"""The `linear-eval` stage: the paper's evaluation protocol, a fast frozen probe and kNN of one encoder."""

from pathlib import Path
from typing import Annotated

import typer

from pipeline.atomic import check_output
from pipeline.metrics import CellMetrics, read_metadata, write
from pipeline.params import UNTRAINED, load_params
from stages.common import PARAMS_FILE, Data, Dataset, Metadata, Method, ParamsFile, Seed


def linear_eval_command(
    dataset: Dataset,
    method: Method,
    seed: Seed,
    data: Data,
    metadata: Metadata,
    metrics: Annotated[Path, typer.Option(help="JSON file to write: the evaluations' top-1 and top-5 accuracies.")],
    variant: Annotated[
        str,
        typer.Option(
            help="The pretrained cell's variant (a name under pretrain.<dataset>.<method>.variants), or `untrained`."
        ),
    ],
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="The pretraining checkpoint; leave out with --variant untrained: the run's initial weights."),
    ] = None,
    params_file: ParamsFile = PARAMS_FILE,
    provenance: Annotated[
        Path | None, typer.Option(help="JSON to write: the machine and software (dvc.yaml: always).")
    ] = None,
) -> None:
    """Top-1/top-5 of the paper's protocol, frozen-probe and kNN top-1 of a pretrained (or the untrained) encoder."""
    from pipeline.errors import UserError
    from pipeline.linear_eval import linear_eval, load_backbone
    from pipeline.loaders import check_betons
    from pipeline.provenance import Provenance, machine
    from pipeline.run import cell_variant, make_run
    from pipeline.runtime import on_device

    if (checkpoint is None) != (variant == UNTRAINED):
        raise UserError(f"give --checkpoint for a pretrained variant, and leave it out with --variant {UNTRAINED}")
    params = load_params(params_file)
    cell_variant(params, dataset, method, variant)  # a wrong name first, then the files
    check_output(metrics)
    if provenance:
        check_output(provenance)
    meta = read_metadata(metadata)
    check_betons(data, meta.num_classes, metadata)
    with on_device(params.training.torch_threads) as device:
        machine(device)  # before evaluating: oneDNN names its ISA on its first use
        run = make_run(params, dataset, method, variant, seed, meta, device)
        result = linear_eval(
            run,
            load_backbone(run, checkpoint),
            data,
            params.linear_eval,
            params.optimizer,
            device,
            params.training.loader_workers,
            params.training.channels_last,
        )
        write(metrics, result)
        if provenance:
            cell = result.model_dump(include=set(CellMetrics.model_fields))
            write(provenance, Provenance(**cell, machine=machine(device)))
