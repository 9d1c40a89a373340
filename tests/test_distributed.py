"""Two CPU ranks (gloo) against one process on the same global batch."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.losses import barlow_twins, nt_xent
from pipeline.runtime import DEVICE_VARIABLE
from pipeline.step import backward
from tests.helpers import REPO, pretrain_args, tiny_params

WORLD = 2


class TwoViews(torch.nn.Module):
    """Both views through one forward call, as `SSLModel` does."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 4)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(4, 6, generator=torch.Generator().manual_seed(1)))

    def forward(self, a, b):
        return self.linear(a), self.linear(b)


def _rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    z_a, z_b = torch.randn(2 * 8, 6), torch.randn(2 * 8, 6)  # the global batch, same on every rank
    local = slice(8 * rank, 8 * (rank + 1))
    results = {}
    for name, loss_fn in (("nt_xent", lambda a, b: nt_xent(a, b, 0.3)), ("barlow_twins", barlow_twins)):
        a, b = z_a[local].clone().requires_grad_(), z_b[local].clone().requires_grad_()
        loss = loss_fn(a, b)
        loss.backward()
        results[name] = (loss.detach(), a.grad, b.grad)
    model = torch.nn.parallel.DistributedDataParallel(TwoViews())
    nt_xent(*model(z_a[local], z_b[local]), 0.3).backward()  # one forward per step, as in pretraining
    results["ddp_weight_grad"] = model.module.linear.weight.grad
    for separate in (False, True):  # pipeline.step.backward, one pass or the regularizer's own pass first
        model.zero_grad(set_to_none=True)
        p_a, p_b = model(z_a[local], z_b[local])
        losses = SimpleNamespace(
            ssl=nt_xent(p_a, p_b, 0.3), classification=torch.zeros(()), regularizer=0.3 * (p_a**2).mean()
        )  # rank-local, as I(Z1;Z2)
        run = SimpleNamespace(variant=SimpleNamespace(mi_grad_fp32=separate), reduced_precision=True)
        backward(losses, run, list(model.parameters()))
        results[f"separate={separate}"] = model.module.linear.weight.grad.clone()
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank, args=(str(tmp / "store"), str(tmp / "out")), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"out.{r}") for r in range(WORLD)]


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
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["world_size"] == WORLD
    assert len((out / "log.csv").read_text().splitlines()) == 1 + 2
