"""The measurements of scripts/gpu-check that need a process group (NCCL): host syncs of a step of the model as
pretraining wraps it, at the world size the GPUs allow, and a world-size-1 smoke test of the collectives."""

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.harness import Trainer, random_batch, synchronize
from pipeline.run import Run
from pipeline.runtime import world_size


def host_syncs(run: Run, batch_size: int, device: torch.device, channels_last: bool) -> dict:
    """Operations that make the host wait for the GPU in one training step (with the gradient ratio, as an epoch's
    first step) of the model as pretraining builds it: pipeline.pretrain's own DDP wrapping, in the process group
    this process joined (none at world size 1). Counted by torch.cuda.set_sync_debug_mode("warn") after two
    warm-up steps (first calls copy constants to the device; DDP rebuilds its buckets after its first step).
    Needs FFCV, which pipeline.pretrain imports."""
    from pipeline.pretrain import _distributed

    trainer = Trainer(run, device, channels_last, wrap=lambda model: _distributed(model, device))  # type: ignore[arg-type]
    images, y = random_batch(run, batch_size, device)
    for _ in range(2):
        trainer.step(images, y, ratio=True)
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step(images, y, ratio=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    norms = sorted({type(m).__name__ for m in trainer.trained.modules() if "Norm" in type(m).__name__})
    return {
        "world_size": world_size(),
        "model": type(trainer.trained).__name__,
        "batch_norms": norms,
        "host_syncs": len(syncs),
        "where": sorted({f"{w.filename}:{w.lineno}" for w in syncs}),
    }


def distributed_smoke(run: Run, batch_size: int, device: torch.device, port: int) -> dict:
    """A world-size-1 NCCL group: autograd all_gather (SimCLR's keys); the SyncBatchNorm function itself (which
    nn.SyncBatchNorm skips at world size 1) against plain batch norm, and whether it makes the host wait; one
    step of `run` under DDP with SyncBatchNorm (as pretraining wraps it) against the same step without."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn
    from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=device)
    try:
        x = torch.randn(8, 4, device=device, requires_grad=True)
        gathered = torch.cat(dist_nn.all_gather(x))
        (gathered * 2).sum().backward()
        result = {
            "all_gather_ok": torch.equal(gathered, x)
            and x.grad is not None
            and torch.equal(x.grad, torch.full_like(x, 2))
        }

        h = torch.randn(16, 8, 4, 4, device=device, requires_grad=True)
        weight = torch.rand(8, device=device, requires_grad=True)
        bias = torch.rand(8, device=device, requires_grad=True)

        def sync_batch_norm() -> Tensor:
            return SyncBatchNormFunction.apply(
                h,
                weight,
                bias,
                torch.zeros(8, device=device),
                torch.ones(8, device=device),
                1e-5,
                0.1,
                dist.group.WORLD,
                1,
            )

        synced, plain = sync_batch_norm(), F.batch_norm(h, None, None, weight, bias, training=True, eps=1e-5)
        grads = [torch.autograd.grad(out.square().sum(), (h, weight, bias)) for out in (synced, plain)]
        result["sync_batch_norm_max_abs_diff"] = max(
            [(synced - plain).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(*grads)]
        )
        torch.cuda.set_sync_debug_mode("error")
        try:
            sync_batch_norm()
            result["sync_batch_norm_waits_for_host"] = False
        except RuntimeError:
            result["sync_batch_norm_waits_for_host"] = True
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return result | {"ddp_step_max_relative_diff": _ddp_step_difference(run, batch_size, device)}
    finally:
        dist.destroy_process_group()


def _ddp_step_difference(run: Run, batch_size: int, device: torch.device) -> float:
    """Largest relative difference of the parameters after one step with and without DDP + SyncBatchNorm."""
    images, y = random_batch(run, batch_size, device)
    plain, wrapped = Trainer(run, device), Trainer(run, device)
    wrapped.trained = torch.nn.parallel.DistributedDataParallel(
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(wrapped.model), device_ids=[device.index]
    )
    for trainer in (plain, wrapped):
        trainer.step(images, y)
    return max(
        ((a - b).norm() / a.norm().clamp(min=1e-12)).item()
        for a, b in zip(plain.model.parameters(), wrapped.model.parameters())
    )
