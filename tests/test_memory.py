"""The memory estimate of a training step (fake tensors, no device) against allocations on real tensors, and
the rule for how many cells share a GPU."""

import dataclasses
import functools

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.memory import (
    CONTEXT_BYTES,
    RESERVE_BYTES,
    SAFETY,
    cells_per_gpu,
    saturating_cells,
    step_peak_bytes,
    training_steps,
)
from pipeline.params import load_params
from pipeline.run import make_run
from tests.helpers import REPO
from tests.test_step import META

GiB = 1 << 30


@functools.cache
def small_run(width: int = 8):
    """The paper's CIFAR-10 SimCLR baseline cell (params.yaml) at a CPU-sized backbone width."""
    run = make_run(
        load_params(REPO / "params.yaml"),
        "cifar10",
        "simclr",
        "baseline",
        0,
        META.model_copy(update={"dataset": "cifar10"}),
        torch.device("cpu"),
    )
    return dataclasses.replace(run, common=run.common.model_copy(update={"backbone_width": width}))


@functools.cache
def estimate(batch_size: int, precision: str) -> int:
    return step_peak_bytes(small_run(), batch_size, precision)


def allocated_peak(fn) -> int:
    """Peak bytes held by torch's CPU allocator while `fn` runs, from the profiler's allocation events (each op's
    own allocations net of its frees, in order of the ops' start): independent of the dispatch-level tracking."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def test_estimate_is_deterministic():
    assert step_peak_bytes(small_run(), 16, "fp32") == estimate(16, "fp32")


def test_estimate_grows_linearly_with_the_batch():
    e8, e16, e32 = (estimate(b, "fp32") for b in (8, 16, 32))
    assert e8 < e16 < e32
    assert (e32 - e16) / (e16 - e8) == pytest.approx(2, rel=0.1)  # activations: per image
    assert e8 - (e16 - e8) > 0  # parameters, gradients and momentum: per cell


def test_estimate_is_smaller_in_bf16():
    assert estimate(32, "bf16") < 0.8 * estimate(32, "fp32")


def test_estimate_matches_real_allocations_on_cpu():
    """Measured with width 8, batch 32: the estimate is 3.6% above what the CPU allocator held."""
    real = allocated_peak(lambda: training_steps(small_run(), 32, 2))
    assert real == pytest.approx(estimate(32, "fp32"), rel=0.1)


def test_cells_per_gpu_follows_the_rule():
    step = 4 * GiB
    assert SAFETY * step + CONTEXT_BYTES == 6 * GiB and RESERVE_BYTES == 2 * GiB  # the example below
    assert cells_per_gpu(step, 80 * GiB) == 13  # floor(78 / 6)
    assert cells_per_gpu(step, 80 * GiB, saturation=4) == 4
    assert cells_per_gpu(step, 7 * GiB) == 0  # one cell does not fit


def test_saturating_cells_is_the_smallest_k_within_10_percent_of_the_best():
    assert saturating_cells({1: 100.0, 2: 180.0, 4: 200.0, 8: 205.0}) == 4
    assert saturating_cells({1: 100.0, 2: 101.0}) == 1
