"""Pretraining on 2 CPU ranks (gloo, DDP) against one process on the global batch: the model `data_parallel` builds,
the regularizer and the logged values on the gathered batch, host syncs, per-rank augmentation, resuming with
another number of processes (issue 18, items 3, 4 and 11)."""

import logging

import pytest
import torch

import pipeline.pretrain
from pipeline.augment import augment_torch, draw
from pipeline.distributed import SyncBatchNorm, data_parallel, sum_over_ranks
from pipeline.errors import UserError
from pipeline.model import build_model, make_optimizer
from pipeline.pretrain import pretrain
from pipeline.runtime import world_size
from pipeline.step import LOGGED, backward, forward, gradient_ratio
from tests.helpers import WORLD, on_ranks, tiny_params
from tests.test_pretrain import cell_run
from tests.test_step import SyncOps, tiny_run

CELLS = (("simclr", "mi_reg"), ("barlow_twins", "mi_reg"))
CPU = torch.device("cpu")
# Float64 ranks against one float64 process differ only in the order of sums (BatchNorm's moments, DDP's mean of
# the ranks' gradients): each sum of n terms is within n·u of its terms' magnitude (u = 2⁻⁵³, Higham), and ~20
# layers chain them. n ≤ 16·32·32 (the first BatchNorm's values per channel): 20·n·u ≈ 4e-11, ×10 for the
# conditioning of the losses (a ReLU flips only if a pre-activation is within that of 0).
RTOL = 10 * 20 * 16 * 32 * 32 * torch.finfo(torch.float64).eps / 2


def global_batch() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    x_a, x_b = (torch.randn(16, 3, 32, 32, generator=generator, dtype=torch.float64) for _ in range(2))
    return x_a, x_b, torch.randint(0, 10, (16,), generator=generator)


def one_step(run, trained: torch.nn.Module, model: torch.nn.Module, x_a, x_b, y) -> dict:
    """A float64 step as pretraining takes it, the values the logs and the report read, and the gradients: the
    regularizer's alone, then the step's (backbone and projector; DDP averages them over ranks)."""
    out = forward(trained, run, x_a, x_b, y)
    ratio = gradient_ratio(out, run)
    named = [(name, p) for name, p in model.named_parameters() if not name.startswith("classifier.")]
    regularizer = torch.autograd.grad(out.regularizer, [p for _, p in named], retain_graph=True)
    backward(out, run, list(model.parameters()))
    return {
        "logged": sum_over_ranks(out.logged) / world_size(),  # as pretraining logs it
        "ratio": ratio,
        "regularizer": out.regularizer.detach(),
        "regularizer_grads": torch.cat([sum_over_ranks(g).flatten() / world_size() for g in regularizer]),  # DDP's mean
        "grads": torch.cat([p.grad.flatten() for _, p in named]),
        "running": torch.cat([b.flatten().double() for name, b in model.named_buffers() if "running" in name]),
    }


def _steps_on_rank(folder) -> dict:
    rank = torch.distributed.get_rank()
    folder = folder / f"rank{rank}"  # its own params file (tiny_run writes one)
    folder.mkdir()
    x_a, x_b, y = (t[8 * rank : 8 * (rank + 1)] for t in global_batch())
    results = {}
    for method, variant in CELLS:
        run = tiny_run(folder, variant=variant, method=method)
        torch.manual_seed(0)
        model = build_model(run).double()
        trained = data_parallel(model, CPU)
        results[method] = one_step(run, trained, model, x_a, x_b, y)
        results[f"{method} sync batch norms"] = sum(isinstance(m, SyncBatchNorm) for m in model.modules())
    results["host syncs"] = host_syncs_of_a_step(folder)
    return results


def host_syncs_of_a_step(folder) -> list[str]:
    """The ops that would make the host wait for a GPU in a bf16 step on this rank, after two warm-up steps
    (DDP rebuilds its buckets after the first): device augmentation, forward, gradient ratio, both backward
    passes, LARS (tests/test_step.py's test at world size 1)."""
    run = tiny_run(folder, variant="mi_reg", precision="bf16")
    torch.manual_seed(0)
    model = build_model(run)
    trained, optimizer = data_parallel(model, CPU), make_optimizer(model, run)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"]
    images, y = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (8,))
    generator, stats, views = torch.Generator().manual_seed(0), run.stats(CPU), run.views()

    def step():
        x_a, x_b = (augment_torch(images, view, draw(8, (32, 32), view, generator), *stats) for view in views)
        out = forward(trained, run, x_a, x_b, y)
        gradient_ratio(out, run)
        optimizer.zero_grad(set_to_none=True)
        backward(out, run, list(model.parameters()))
        optimizer.step()

    step(), step()
    with SyncOps() as ops:
        step()
    return ops.found


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("steps")
    return on_ranks(_steps_on_rank, folder, folder)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one")
    results = {}
    for method, variant in CELLS:
        run = tiny_run(folder, variant=variant, method=method)
        torch.manual_seed(0)
        model = build_model(run).double()
        results[method] = one_step(run, model, model, *global_batch())
    return results


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=RTOL * expected.abs().max().item())


def test_data_parallel_synchronizes_every_batch_norm(ranks):
    assert ranks[0]["simclr sync batch norms"] == 20 and ranks[0]["barlow_twins sync batch norms"] == 22


@pytest.mark.parametrize("method", ["simclr", "barlow_twins"])
def test_logged_values_are_the_global_batch_s(ranks, one_process, method):
    """Regression (issue 18, item 11): I(Z1;Z2), H(Z1) and the I(Z1;R) estimate came from each rank's half of the
    batch, and only rank 0's were logged. Now: one process's values on the global batch, whatever the number of
    processes (BatchNorm statistics included), except Barlow Twins' loss, whose reference semantics depend on it
    (each rank normalizes its own batch: docs/method.md 3.2)."""
    columns = [k for k, name in enumerate(LOGGED) if not (method == "barlow_twins" and name == "ssl_loss")]
    for r in ranks:
        assert_close(r[method]["logged"][columns], one_process[method]["logged"][columns])
        assert_close(r[method]["running"], one_process[method]["running"])


@pytest.mark.parametrize("method", ["simclr", "barlow_twins"])
def test_regularizer_is_one_process_s_on_the_global_batch(ranks, one_process, method):
    """λ·I(Z1;Z2), and its gradient as DDP averages it over ranks, equal one process's on the global batch."""
    for r in ranks:
        assert_close(r[method]["regularizer"], one_process[method]["regularizer"])
        assert_close(r[method]["regularizer_grads"], one_process[method]["regularizer_grads"])


def test_simclr_step_is_one_process_s(ranks, one_process):
    """The whole SimCLR step (SyncBatchNorm, gathered keys and regularizer, DDP's mean) and the gradient ratio,
    whose two norms are float32 sums of n = 2·16·32 squares (h's size): within 2·(n + 1)·u, u = 2⁻²⁴, of each other."""
    ratio_rtol = 2 * (2 * 16 * 32 + 1) * torch.finfo(torch.float32).eps / 2
    for r in ranks:
        assert_close(r["simclr"]["grads"], one_process["simclr"]["grads"])
        torch.testing.assert_close(r["simclr"]["ratio"], one_process["simclr"]["ratio"], rtol=ratio_rtol, atol=0)


def test_a_data_parallel_step_makes_the_host_wait_nowhere(ranks):
    """Issue 18, item 4: torch's SyncBatchNorm indexes with a boolean mask, a device-to-host sync per layer."""
    assert [r["host syncs"] for r in ranks] == [[], []]


def recorded_pretrain(params, dataset, folder, methods) -> dict:
    """`pretrain` of the tiny cells of `methods`, recording the first 4 uniforms of the augmentation generator
    that every call of the augmentation gets; the last epoch's metrics."""
    draws, augment = [], pipeline.pretrain.augment

    def recording(x, spec, mean, std, generator):
        probe = torch.Generator(generator.device)
        probe.set_state(generator.get_state())
        draws.append(torch.rand(4, generator=probe))
        return augment(x, spec, mean, std, generator)

    pipeline.pretrain.augment = recording
    try:
        metrics = {m: pretrain(*cell_run(params, dataset, m), dataset / "ffcv", folder / m, CPU, "v") for m in methods}
    finally:
        pipeline.pretrain.augment = augment
    return {"draws": torch.stack(draws), "metrics": {m: v.model_dump() for m, v in metrics.items()}}


@pytest.fixture(scope="module")
def pretrained_on_ranks(tiny_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrain")
    params = tiny_params(folder / "p.yaml", epochs=1)
    ranks = on_ranks(recorded_pretrain, folder, params, tiny_dataset, folder, ("simclr", "barlow_twins"))
    return params, folder, ranks


@pytest.mark.slow
def test_each_rank_draws_its_own_augmentation(pretrained_on_ranks, tiny_dataset, tmp_path):
    """Regression (issue 18, item 3): every rank seeded its generator alike, so sample i of each rank got the
    same crop, flip and colour draws. One process still draws epoch_seed's stream, as rank 0 does."""
    params, _, ranks = pretrained_on_ranks
    assert ranks[0]["draws"].shape == ranks[1]["draws"].shape == (2 * 2 * 5, 4)  # cells × views × steps
    assert not torch.isclose(ranks[0]["draws"], ranks[1]["draws"]).any()
    one = recorded_pretrain(params, tiny_dataset, tmp_path, ("simclr",))
    run, _ = cell_run(params, tiny_dataset)
    assert torch.equal(one["draws"][0], torch.rand(4, generator=torch.Generator().manual_seed(run.epoch_seed(0))))
    assert torch.equal(ranks[0]["draws"][0], one["draws"][0])


@pytest.mark.slow
def test_every_rank_logs_the_global_batch_s_values(pretrained_on_ranks):
    """Regression (issue 18, item 11): each rank averaged its own half of the batch and only rank 0's were saved."""
    _, _, ranks = pretrained_on_ranks
    for method in ("simclr", "barlow_twins"):
        assert ranks[0]["metrics"][method] | {"images_per_s": 0} == ranks[1]["metrics"][method] | {"images_per_s": 0}


@pytest.mark.slow
def test_a_checkpoint_resumes_with_another_world_size_unless_barlow_twins(pretrained_on_ranks, tiny_dataset, caplog):
    """Issue 18, item 11: nothing in SimCLR's training depends on the number of processes any more, so its
    checkpoint of 2 processes resumes in one; Barlow Twins' gradient does (docs/method.md 3.2): refused, with what
    to do. Before, both started over with a warning."""
    params, folder, ranks = pretrained_on_ranks
    run, training = cell_run(params, tiny_dataset, "simclr")
    with caplog.at_level(logging.INFO, logger="pipeline.pretrain"):
        resumed = pretrain(run, training, tiny_dataset / "ffcv", folder / "simclr", CPU, "v")
    assert f"trained by {WORLD} processes" in caplog.text
    assert resumed.model_dump() == ranks[0]["metrics"]["simclr"]
    run, training = cell_run(params, tiny_dataset, "barlow_twins")
    with pytest.raises(UserError, match=rf"checkpoint.pt was trained by {WORLD} processes, and this run has 1: barlow"):
        pretrain(run, training, tiny_dataset / "ffcv", folder / "barlow_twins", CPU, "v")
