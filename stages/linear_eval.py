"""The `linear-eval` stage: the paper's evaluation protocol, a fast frozen probe and kNN of one encoder."""

from pathlib import Path
from typing import Annotated

import typer

from pipeline.atomic import atomic_file
from pipeline.metrics import read_metadata
from pipeline.params import UNTRAINED, load_params
from stages.common import PARAMS_FILE, Data, Dataset, Metadata, Method, ParamsFile, Seed


def linear_eval_command(
    dataset: Dataset,
    method: Method,
    seed: Seed,
    data: Data,
    metadata: Metadata,
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write.")],
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
) -> None:
    """Top-1/top-5 of the paper's protocol, frozen-probe and kNN top-1 of a pretrained (or the untrained) encoder."""
    from pipeline.errors import UserError
    from pipeline.linear_eval import linear_eval, load_backbone
    from pipeline.loaders import check_betons
    from pipeline.run import make_run
    from pipeline.runtime import on_device

    if (checkpoint is None) != (variant == UNTRAINED):
        raise UserError(f"give --checkpoint for a pretrained variant, and leave it out with --variant {UNTRAINED}")
    params = load_params(params_file)
    meta = read_metadata(metadata)
    check_betons(data, meta.num_classes, metadata)
    with on_device(params.training.torch_threads) as device:
        run = make_run(params, dataset, method, variant, seed, meta, device)
        result = linear_eval(
            run,
            load_backbone(run, checkpoint),
            data,
            params.linear_eval,
            params.optimizer,
            device,
            params.training.loader_workers,
        )
    with atomic_file(metrics) as staging:
        staging.write_text(result.model_dump_json(indent=2) + "\n")
