"""Two CPU ranks (gloo) against one process on the same global batch: the losses under DDP, SyncBatchNorm."""

import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from pipeline.distributed import SyncBatchNorm, gather_views
from pipeline.losses import barlow_twins, nt_xent
from pipeline.runtime import DEVICE_VARIABLE
from pipeline.step import backward
from tests.helpers import REPO, WORLD, on_ranks, pretrain_args, tiny_params

EPS64 = torch.finfo(torch.float64).eps / 2  # float64's unit roundoff u
EPS32 = torch.finfo(torch.float32).eps / 2
BF16 = torch.finfo(torch.bfloat16).eps / 2


class TwoViews(torch.nn.Module):
    """Both views through one forward call, as `SSLModel` does."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 4)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(4, 6, generator=torch.Generator().manual_seed(1)))

    def forward(self, a, b):
        return self.linear(a), self.linear(b)


def _losses_on_rank() -> dict:
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    z_a, z_b = torch.randn(2 * 8, 6), torch.randn(2 * 8, 6)  # the global batch, same on every rank
    local = slice(8 * rank, 8 * (rank + 1))
    results = {}
    for name, loss_fn in (("nt_xent", lambda a, b: nt_xent(a, b, 0.3)), ("barlow_twins", barlow_twins)):
        a, b = z_a[local].clone().requires_grad_(), z_b[local].clone().requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = loss_fn(a, b)
            loss.backward()
        results[name] = (loss.detach(), a.grad, b.grad)
        results[f"{name} warnings"] = [str(w.message) for w in caught]
    model = torch.nn.parallel.DistributedDataParallel(TwoViews())
    nt_xent(*model(z_a[local], z_b[local]), 0.3).backward()  # one forward per step, as in pretraining
    results["ddp_weight_grad"] = model.module.linear.weight.grad
    for separate in (False, True):  # pipeline.step.backward, one pass or the regularizer's own pass first
        model.zero_grad(set_to_none=True)
        p_a, p_b = model(z_a[local], z_b[local])
        losses = SimpleNamespace(
            ssl=nt_xent(p_a, p_b, 0.3), classification=torch.zeros(()), regularizer=0.3 * (p_a**2).mean()
        )  # rank-local
        run = SimpleNamespace(variant=SimpleNamespace(mi_grad_fp32=separate), reduced_precision=True)
        backward(losses, run, list(model.parameters()))
        results[f"separate={separate}"] = model.module.linear.weight.grad.clone()
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return on_ranks(_losses_on_rank, tmp_path_factory.mktemp("ddp"))


def global_batch():
    torch.manual_seed(0)
    return torch.randn(16, 6), torch.randn(16, 6)


def test_nt_xent_with_gathered_keys_equals_one_process(ranks):
    z_a, z_b = (z.requires_grad_() for z in global_batch())
    loss = nt_xent(z_a, z_b, 0.3)
    loss.backward()
    # The mean of the ranks' losses is the global loss; DDP's gradient averaging divides by the world size.
    torch.testing.assert_close(sum(r["nt_xent"][0] for r in ranks) / WORLD, loss.detach())
    torch.testing.assert_close(torch.cat([r["nt_xent"][1] for r in ranks]) / WORLD, z_a.grad)
    torch.testing.assert_close(torch.cat([r["nt_xent"][2] for r in ranks]) / WORLD, z_b.grad)


def test_ddp_model_gradient_equals_one_process(ranks):
    z_a, z_b = global_batch()
    model = TwoViews()
    nt_xent(*model(z_a, z_b), 0.3).backward()
    for r in ranks:
        torch.testing.assert_close(r["ddp_weight_grad"], model.linear.weight.grad)


def test_regularizer_with_its_own_backward_is_all_reduced_like_the_summed_loss(ranks):
    """The regularizer's gradient, stored in .grad before the SSL backward, is averaged over ranks by DDP."""
    for r in ranks:
        torch.testing.assert_close(r["separate=True"], r["separate=False"])
    assert not torch.allclose(ranks[0]["separate=False"], ranks[0]["ddp_weight_grad"])  # the regularizer counts


def test_barlow_twins_averages_the_cross_correlation_as_the_reference(ranks):
    """Each rank normalizes its own batch; c is the mean of the ranks' c; gradients flow through the local c."""
    z_a, z_b = global_batch()
    halves = [
        (z_a[:8].clone().requires_grad_(), z_b[:8].clone().requires_grad_()),
        (z_a[8:].clone().requires_grad_(), z_b[8:].clone().requires_grad_()),
    ]

    def bn(z):
        return torch.nn.functional.batch_norm(z, None, None, training=True, eps=1e-5)

    cs = [bn(a).T @ bn(b) / 8 for a, b in halves]
    for r, (a, b) in enumerate(halves):
        c = (cs[r] + cs[1 - r].detach()) / WORLD  # what rank r computes: only its own c carries gradient
        off = c - torch.diag(torch.diag(c))
        loss = 0.1 * (((1 - torch.diag(c)) ** 2).sum() + 0.0051 * (off**2).sum())
        loss.backward()
        torch.testing.assert_close(ranks[r]["barlow_twins"][0], loss.detach())
        torch.testing.assert_close(ranks[r]["barlow_twins"][1], a.grad)
        torch.testing.assert_close(ranks[r]["barlow_twins"][2], b.grad)


def test_barlow_twins_does_not_backpropagate_through_the_collective(ranks):
    """Regression (issue 18, item 6): autograd went through dist.all_reduce, whose deprecated fallback warns
    ("an autograd kernel was not registered") and is announced to become an error."""
    for r in ranks:
        assert r["barlow_twins warnings"] == [] and r["nt_xent warnings"] == []


SHAPES = ((16, 3, 4, 4), (16, 5))  # BatchNorm2d (the backbone) and BatchNorm1d (Barlow Twins' projector)


def batch_norm_case(shape: tuple[int, ...], step: int) -> tuple[torch.Tensor, ...]:
    """A global float64 batch whose second half (rank 1's) is shifted, so that per-rank statistics are wrong, the
    gradient flowing into the output (bf16 values: a bf16 output passes it on unrounded), the affine parameters."""
    generator = torch.Generator().manual_seed(10 * step + len(shape))
    x = 2 * torch.randn(shape, generator=generator, dtype=torch.float64) + 3
    x[shape[0] // 2 :] += 1.5
    upstream = torch.randn(shape, generator=generator, dtype=torch.float64).bfloat16().double()
    weight, bias = torch.rand(shape[1], generator=generator) + 0.5, torch.randn(shape[1], generator=generator)
    return x, upstream, weight, bias


def batch_norm(shape: tuple[int, ...], weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype):
    bn = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(shape[1]).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(weight), bn.bias.copy_(bias)
    return bn


def batch_norm_steps(bn: torch.nn.Module, shape: tuple[int, ...], rows: slice, dtype: torch.dtype, via=None) -> dict:
    """Two training steps of `bn` on `rows` of the global batches (input cast to `dtype`, after rounding to `via`),
    then eval mode."""
    result: dict = {"steps": []}
    for step in range(2):
        x, upstream, _, _ = batch_norm_case(shape, step)
        x = x[rows].to(via or dtype).to(dtype).requires_grad_()
        bn.zero_grad()
        y = bn(x)
        (y.double() * upstream[rows]).sum().backward()
        result["steps"].append({"y": y.detach(), "x": x.grad, "weight": bn.weight.grad, "bias": bn.bias.grad})
    result |= {"running_mean": bn.running_mean, "running_var": bn.running_var, "tracked": bn.num_batches_tracked}
    with torch.no_grad():
        result["eval"] = bn.eval()(batch_norm_case(shape, 0)[0][rows].to(via or dtype).to(dtype))
    return result


def _batch_norm_on_rank() -> dict:
    rank = torch.distributed.get_rank()
    results = {}
    for shape in SHAPES:
        rows = slice(shape[0] // WORLD * rank, shape[0] // WORLD * (rank + 1))
        _, _, weight, bias = batch_norm_case(shape, 0)
        for dtype in (torch.float64, torch.bfloat16):  # bf16: what a convolution under autocast hands it
            bn = SyncBatchNorm.from_batch_norm(
                batch_norm(shape, weight, bias, torch.float64 if dtype == torch.float64 else torch.float32)
            )
            results[shape, dtype] = batch_norm_steps(bn, shape, rows, dtype)
    generator = torch.Generator().manual_seed(0)
    a, b, upstream = (torch.randn(16, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    local = slice(8 * rank, 8 * (rank + 1))
    a, b = a[local].clone().requires_grad_(), b[local].clone().requires_grad_()
    gathered = gather_views(a, b)
    (gathered * torch.cat([upstream, 2 * upstream])).sum().backward()
    return {"batch_norm": results, "gathered": gathered.detach(), "gathered_grads": (a.grad, b.grad)}


@pytest.fixture(scope="module")
def synchronized(tmp_path_factory):
    return on_ranks(_batch_norm_on_rank, tmp_path_factory.mktemp("sync"))


@pytest.mark.parametrize("shape", SHAPES)
def test_sync_batch_norm_is_batch_norm_of_the_global_batch(synchronized, shape):
    """Forward, input gradient, weight and bias gradients (summed over ranks: DDP averages them as it averages
    the ranks' losses), running statistics, eval mode: those of one BatchNorm over both ranks' rows, in float64.
    The two differ only in the order of their sums (per-rank moments combined, against one pass): each of the
    at most 4 sums an output depends on (mean, variance, Σg, Σg·x̂) is within n·u·max|term| of its value
    (n = values per channel, u = 2⁻⁵³; Higham, recursive summation), and each output is O(1) times them."""
    _, _, weight, bias = batch_norm_case(shape, 0)
    expected = batch_norm_steps(batch_norm(shape, weight, bias, torch.float64), shape, slice(None), torch.float64)
    n = shape[0] * (shape[2] * shape[3] if len(shape) == 4 else 1)
    tolerance = {"rtol": 0, "atol": 4 * n * EPS64 * 16}  # |x| < 16 here
    got = [r["batch_norm"][shape, torch.float64] for r in synchronized]
    for step, want in enumerate(expected["steps"]):
        for name in ("y", "x"):
            torch.testing.assert_close(torch.cat([r["steps"][step][name] for r in got]), want[name], **tolerance)
        for name in ("weight", "bias"):
            torch.testing.assert_close(sum(r["steps"][step][name] for r in got), want[name], **tolerance)
    for r in got:
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(r[name], expected[name], **tolerance)
        assert r["tracked"] == expected["tracked"] == 2
    torch.testing.assert_close(torch.cat([r["eval"] for r in got]), expected["eval"], **tolerance)


@pytest.mark.parametrize("shape", SHAPES)
def test_sync_batch_norm_of_bf16_input_rounds_once(synchronized, shape):
    """bf16 input, as a convolution under autocast gives it: statistics and gradients in float32, the output and
    input gradient rounded once to bf16, so within bf16's unit roundoff (2⁻⁸) of float64 batch norm of the same
    bf16 values, plus the float32 sums' error (bounded as in the float64 test, with float32's u = 2⁻²⁴)."""
    _, _, weight, bias = batch_norm_case(shape, 0)
    expected = batch_norm_steps(
        batch_norm(shape, weight, bias, torch.float64), shape, slice(None), torch.float64, via=torch.bfloat16
    )
    n = shape[0] * (shape[2] * shape[3] if len(shape) == 4 else 1)
    got = [r["batch_norm"][shape, torch.bfloat16] for r in synchronized]
    for step, want in enumerate(expected["steps"]):
        for name in ("y", "x"):
            value = torch.cat([r["steps"][step][name] for r in got])
            assert value.dtype == torch.bfloat16
            torch.testing.assert_close(value.double(), want[name], rtol=BF16, atol=4 * n * EPS32 * 16)


def test_gather_views_lays_out_the_global_batch_and_returns_every_rank_s_gradient(synchronized):
    generator = torch.Generator().manual_seed(0)
    a, b, upstream = (torch.randn(16, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    assert all(torch.equal(r["gathered"], torch.cat([a, b])) for r in synchronized)  # [a of ranks 0, 1; b of 0, 1]
    for rank, r in enumerate(synchronized):  # each rank's loss sends its rows their gradient: WORLD times it
        rows = slice(8 * rank, 8 * (rank + 1))
        assert torch.equal(r["gathered_grads"][0], WORLD * upstream[rows])
        assert torch.equal(r["gathered_grads"][1], WORLD * 2 * upstream[rows])


@pytest.mark.slow
def test_pretrain_stage_runs_under_torchrun(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    # --local-addr: in scripts/container-check's container the hostname does not resolve
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--local-addr=127.0.0.1",
        f"--nproc-per-node={WORLD}",
        "-m",
        "stages",
        *pretrain_args(tiny_params(tmp_path / "p.yaml", epochs=2), tiny_dataset, out),
    ]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, env={**os.environ, DEVICE_VARIABLE: "cpu"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["world_size"] == WORLD
    assert len((out / "log.csv").read_text().splitlines()) == 1 + 2
