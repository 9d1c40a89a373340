"""The `linear-eval` stage: a frozen pretrained encoder, a linear classifier and kNN on its features."""

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.atomic import atomic_file
from pipeline.params import load_params
from stages.common import PARAMS_FILE, Data, Dataset, Metadata, Method, ParamsFile, Seed, Variant


def linear_eval_command(
        dataset: Dataset, method: Method, variant: Variant, seed: Seed, data: Data, metadata: Metadata,
        metrics: Annotated[Path, typer.Option(help="Metrics JSON to write.")],
        checkpoint: Annotated[Path | None, typer.Option(help="The pretraining checkpoint; leave out to evaluate "
                                                            "the untrained encoder (the run's initial weights).")] = None,
        params_file: ParamsFile = PARAMS_FILE) -> None:
    """Linear top-1/top-5 and kNN top-1 of a pretrained (or the untrained) encoder on the test split."""
    from pipeline.loaders import check_betons
    from pipeline.metrics import read_metadata
    from pipeline.linear_eval import linear_eval
    from pipeline.pretrain import make_run
    from pipeline.runtime import init_device
    params = load_params(params_file)
    meta = read_metadata(metadata)
    check_betons(data, meta.num_classes, metadata)
    run = make_run(params, dataset, method, variant, seed, meta.model_dump())
    result = linear_eval(run, checkpoint, data, params.linear_eval, init_device())
    with atomic_file(metrics) as staging:
        staging.write_text(json.dumps({"dataset": dataset, "method": method, "variant": variant, "seed": seed}
                                      | result, indent=2) + "\n")
