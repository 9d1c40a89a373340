"""Training across processes (torchrun): the DDP model with exact BatchNorm statistics, and combining across ranks.

Every rank holds a full batch of B/W images (the loader's padded order and drop_last). At world size 1 (no process
group) each function here is the single-process computation itself, so one process computes what it did without them.
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline.runtime import world_size


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def gather_views(a: Tensor, b: Tensor) -> Tensor:
    """(2·N·W, F) from this rank's two views (N, F) each: view a of every rank's images in rank order, then view b,
    as one process holding the global batch lays them out. Autograd-aware: each rank's rows get the gradients that
    every rank's loss sends them (so DDP's average over ranks gives the single-process gradient of a loss computed
    on the gathered batch by every rank)."""
    if world_size() == 1:
        return torch.cat([a, b])
    gathered = all_gather(torch.stack([a, b])).unflatten(0, (world_size(), 2))  # (W, 2, N, F)
    return gathered.transpose(0, 1).flatten(0, 2)


def all_gather(t: Tensor) -> Tensor:
    """Every rank's `t` concatenated along dimension 0, in rank order; autograd-aware (the gradient of each rank's
    block is the sum over ranks of theirs). torch's replacement for the deprecated torch.distributed.nn.functional
    all_gather (same gradient), which warns."""
    group = dist.group.WORLD
    assert group is not None, "no process group"
    return funcol.all_gather_single(t, 0, group)


def sum_over_ranks(t: Tensor) -> Tensor:
    """The sum of `t` over ranks, outside autograd (`t` detached at world size 1)."""
    if world_size() == 1:
        return t.detach()
    total = t.detach().clone()
    dist.all_reduce(total)
    return total


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """What trains `model` under a process group (torchrun): DDP, its BatchNorm layers replaced in place by
    SyncBatchNorm (same parameters and buffers: optimizers, checkpoints and evaluation of `model` are unchanged);
    `model` itself without a group. The one place that decides how a model trains across processes: pretraining and
    scripts/gpu-check call it."""
    if not dist.is_initialized():
        return model
    _synchronize_batch_norm(model)
    # Running statistics come from the same gathered moments on every rank, so they agree: no broadcast per forward.
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


def _synchronize_batch_norm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm):
            setattr(module, name, SyncBatchNorm.from_batch_norm(child))
        else:
            _synchronize_batch_norm(child)


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the batch of all ranks, exactly (each rank's count, mean
    and variance gathered and combined), on any device (gloo on CPU too) and without making the host wait: unlike
    torch.nn.SyncBatchNorm, no boolean mask over ranks with empty batches (a device-to-host sync per layer).
    Weight and bias gradients are this rank's sums, as torch's (DDP averages them). Eval mode: as BatchNorm."""

    @classmethod
    def from_batch_norm(cls, bn: _BatchNorm) -> "SyncBatchNorm":
        assert bn.affine and bn.track_running_stats and bn.momentum is not None, f"unsupported {bn}"
        sync = cls(bn.num_features, bn.eps, bn.momentum)
        sync.weight, sync.bias = bn.weight, bn.bias
        sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
        sync.num_batches_tracked = bn.num_batches_tracked
        return sync.train(bn.training)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected a batch of 2 or more dimensions (N, C, ...), got {input.dim()}")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, eps=self.eps)
        assert self.num_batches_tracked is not None and self.momentum is not None
        self.num_batches_tracked.add_(1)
        args = (self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.momentum)
        return _GlobalBatchNorm.apply(input, *args)


class _GlobalBatchNorm(torch.autograd.Function):
    """y = (x − μ)/√(σ² + ε)·w + b with μ, σ² over every rank's batch; statistics and gradients in float32 (or the
    input's wider type) under autocast."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):  # type: ignore[override]
        with torch.autocast(x.device.type, enabled=False):
            mean, var, count = _global_moments(x)
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * count / (count - 1), alpha=momentum)  # unbiased, as BatchNorm
            y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)  # the statistics as given
        ctx.save_for_backward(x, weight, mean, var, count)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, mean, var, count = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)  # per channel, broadcast over (N, C, ...)
        dims = [d for d in range(x.dim()) if d != 1]
        invstd = torch.rsqrt(var + ctx.eps)
        g = grad_y.to(mean.dtype)
        x_hat = (x.to(mean.dtype) - mean.view(shape)) * invstd.view(shape)
        local = torch.cat([g.sum(dims), (g * x_hat).sum(dims)])  # Σg, Σg·x̂ over this rank: bias, weight grads
        mean_g, mean_g_x_hat = (sum_over_ranks(local) / count).chunk(2)  # over the global batch
        grad_x = (g - mean_g.view(shape) - x_hat * mean_g_x_hat.view(shape)) * (weight * invstd).view(shape)
        grad_bias, grad_weight = local.chunk(2)
        return grad_x.to(x.dtype), grad_weight, grad_bias, None, None, None, None


def _global_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per channel mean and biased variance (C,) over every rank's batch, and its number of values per channel."""
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x.to(torch.promote_types(x.dtype, torch.float32)), dims, correction=0)
    count = torch.full((1,), x.numel() // x.shape[1], dtype=mean.dtype, device=x.device)
    rows = [torch.empty(1 + 2 * len(mean), dtype=mean.dtype, device=x.device) for _ in range(world_size())]
    dist.all_gather(rows, torch.cat([count, mean, var]))
    counts, means, variances = torch.stack(rows).split([1, len(mean), len(mean)], dim=1)  # (W, 1), (W, C), (W, C)
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / total  # Chan et al.: within plus between ranks
    return mean, var, total
