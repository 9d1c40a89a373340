"""The `bench` command: loading, training-step and regularizer speed, side by side in one run."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pipeline.atomic import atomic_file
from pipeline.errors import UserError
from pipeline.metrics import read_metadata
from pipeline.params import load_params
from stages.common import PARAMS_FILE, Data, Dataset, Metadata, Method, ParamsFile


def bench(
    dataset: Dataset,
    raw: Annotated[Path, typer.Option(help="The folder `prepare` wrote (the reference's PIL loader reads it).")],
    data: Data,
    metadata: Metadata,
    out: Annotated[Path, typer.Option(help="JSON file to write: the measured speeds, shares and memory.")],
    method: Method = "simclr",
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 256,
    width: Annotated[int, typer.Option(help="Backbone width for (b) and (c); 64 is the paper's.")] = 64,
    batches: Annotated[int, typer.Option(min=1, help="Batches timed per loading path.")] = 20,
    steps: Annotated[int, typer.Option(min=1, help="Training steps timed per configuration.")] = 3,
    workers: Annotated[int, typer.Option(min=1, help="Loader workers, both paths.")] = os.cpu_count() or 1,
    params_file: ParamsFile = PARAMS_FILE,
) -> None:
    """Measure (a) two-view batches/s, ours vs the reference's PIL DataLoader, (b) pretraining images/s,
    (c) the MI regularizer's share of the step time (its forward + backward against a training step), and
    estimate (d) a training step's peak memory at the GPU's precision (measured too on a GPU); first, (e) the
    start-up of the pretrain and linear-eval stages: seconds from process start until the first training batch
    and the first evaluation batch are ready to compute (each stage run on this dataset, stopped there)."""
    import torch

    from pipeline.bench import batches_per_second, our_batches, reference_batches, regularizer_seconds, step_seconds
    from pipeline.datasets import get_dataset
    from pipeline.loaders import check_betons
    from pipeline.memory import step_peak_bytes
    from pipeline.run import make_run
    from pipeline.runtime import choose_device

    params = load_params(params_file)
    meta = read_metadata(metadata)
    check_betons(data, meta.num_classes, metadata)
    cell = ["--params", str(params_file), "--dataset", dataset, "--method", method, "--seed", "0"]
    cell += ["--data", str(data), "--metadata", str(metadata)]
    startup = {
        "pretrain_s": _startup_seconds(["pretrain", *cell, "--variant", "baseline"], "first training batch ready"),
        "linear_eval_s": _startup_seconds(
            ["linear-eval", *cell, "--variant", "untrained"], "first evaluation batch ready"
        ),
    }
    device = choose_device()
    torch.set_num_threads(workers)  # the step times with as many CPU threads as the loaders decode with
    run = make_run(params, dataset, method, "baseline", 0, meta, device)
    run = dataclasses.replace(run, common=run.common.model_copy(update={"backbone_width": width}))
    split = get_dataset(dataset).load(raw).train  # the reference forks its workers before FFCV starts threads
    reference = batches_per_second(reference_batches(run, split, batch_size, workers), batches, 3)
    ours = batches_per_second(our_batches(run, data / "train.beton", batch_size, workers, device), batches, 3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = step_seconds(run, batch_size, steps, device)
    measured = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    estimate = step_peak_bytes(run, batch_size, params.training.precision)
    regularizer = regularizer_seconds(run, batch_size, 20, device)
    results: dict[str, Any] = {
        "device": str(device),
        "dataset": dataset,
        "method": method,
        "batch_size": batch_size,
        "workers": workers,
        "backbone_width": width,
        "loading": {"ours_batches_per_s": ours, "reference_batches_per_s": reference, "speedup": ours / reference},
        "pretrain_images_per_s": batch_size / step,
        "step_s": step,
        "regularizer_s": regularizer,
        "regularizer_share": regularizer / (step + regularizer),
        "startup": startup,
        "memory": {
            "precision": params.training.precision,
            "step_peak_bytes_estimate": estimate,
            "step_peak_bytes_measured": measured,
        },
    }
    table = Table("measurement", "value", title=f"bench on {device} ({dataset}, batch {batch_size})")
    table.add_row("start-up: process start to first training batch", f"{startup['pretrain_s']:.1f} s")
    table.add_row("start-up: process start to first evaluation batch", f"{startup['linear_eval_s']:.1f} s")
    table.add_row("two-view batches/s: ours", f"{ours:.2f} ({ours * batch_size:.0f} images/s)")
    table.add_row(
        "two-view batches/s: reference (PIL DataLoader)", f"{reference:.2f} ({reference * batch_size:.0f} images/s)"
    )
    table.add_row("loading speedup", f"{ours / reference:.1f}x")
    table.add_row(f"pretrain images/s (width {width})", f"{batch_size / step:.1f} ({step:.2f} s/step)")
    table.add_row(
        "regularizer share of step time", f"{100 * results['regularizer_share']:.2f}% ({1000 * regularizer:.1f} ms)"
    )
    measured_text = f", {measured / 2**30:.2f} GiB measured" if measured else ""
    table.add_row(
        f"step peak memory, {params.training.precision} (pipeline.memory)",
        f"{estimate / 2**30:.2f} GiB estimated{measured_text}",
    )
    Console().print(table)
    with atomic_file(out) as staging:
        staging.write_text(json.dumps(results, indent=2) + "\n")


def _startup_seconds(args: list[str], event: str) -> float:
    """`python -m stages ARGS` until it logs `EVENT X s after the process started` (its own reading of its
    start time); then the process is stopped. Outputs go to a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        outputs = ["--metrics", f"{tmp}/metrics.json"] + (["--out", f"{tmp}/run"] if args[0] == "pretrain" else [])
        process = subprocess.Popen(
            [sys.executable, "-m", "stages", *args, *outputs],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert process.stderr is not None
            for line in process.stderr:
                if match := re.search(rf"{event} ([\d.]+) s after the process started", line):
                    return float(match[1])
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    raise UserError(f"`python -m stages {args[0]}` ended before its {event} (exit {process.returncode})")
