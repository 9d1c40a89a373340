"""The measurements of scripts/gpu-check that need a process group (NCCL): host syncs of a step of the model as
pretraining wraps it, at the world size the GPUs allow, and a world-size-1 smoke test of the collectives."""

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distributed import SyncBatchNorm, all_gather, data_parallel
from pipeline.harness import Trainer, random_batch, synchronize
from pipeline.run import Run
from pipeline.runtime import world_size


def host_syncs(run: Run, batch_size: int, device: torch.device, channels_last: bool) -> dict:
    """Operations that make the host wait for the GPU in one training step (with the gradient ratio, as an epoch's
    first step) of the model as pretraining builds it (`pipeline.distributed.data_parallel`), in the process group this
    process joined (none at world size 1). Counted by torch.cuda.set_sync_debug_mode("warn") after two warm-up steps
    (first calls copy constants to the device; DDP rebuilds its buckets after its first step)."""
    trainer = Trainer(run, device, channels_last, wrap=lambda model: data_parallel(model, device))
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
    """A world-size-1 NCCL group: the autograd-aware all_gather (SimCLR's keys, the MI's batch); the pipeline's
    SyncBatchNorm (which synchronizes at world size 1 too) against plain batch norm, and whether its forward and
    backward make the host wait; one step of `run` through `data_parallel` (as pretraining wraps it) against the
    same step without."""
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=device)
    try:
        x = torch.randn(8, 4, device=device, requires_grad=True)
        gathered = all_gather(x)
        (gathered * 2).sum().backward()
        result: dict[str, object] = {
            "all_gather_ok": torch.equal(gathered, x)
            and x.grad is not None
            and torch.equal(x.grad, torch.full_like(x, 2))
        }

        h = torch.randn(16, 8, 4, 4, device=device, requires_grad=True)
        sync_bn = SyncBatchNorm.from_batch_norm(nn.BatchNorm2d(8).to(device))
        with torch.no_grad():
            sync_bn.weight.uniform_(0.5, 1.5), sync_bn.bias.uniform_(-1, 1)
        weight, bias = sync_bn.weight, sync_bn.bias

        def sync_batch_norm() -> tuple[Tensor, ...]:
            out = sync_bn(h)
            return (out, *torch.autograd.grad(out.square().sum(), (h, weight, bias)))

        plain = F.batch_norm(h, None, None, weight, bias, training=True, eps=1e-5)
        expected = (plain, *torch.autograd.grad(plain.square().sum(), (h, weight, bias)))
        result["sync_batch_norm_max_abs_diff"] = max(
            (a - b).abs().max().item() for a, b in zip(sync_batch_norm(), expected)
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
    """Largest relative difference of the parameters after one step with and without `data_parallel`."""
    images, y = random_batch(run, batch_size, device)
    plain, wrapped = Trainer(run, device), Trainer(run, device)
    wrapped.trained = data_parallel(wrapped.model, device)
    for trainer in (plain, wrapped):
        trainer.step(images, y)
    return max(
        ((a - b).norm() / a.norm().clamp(min=1e-12)).item()
        for a, b in zip(plain.model.parameters(), wrapped.model.parameters())
    )
