"""LARS and the warmup-cosine schedule of PAPER.md section 4 (solo-learn's semantics)."""

import math

import torch
from torch import Tensor


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update is scaled per parameter by a trust ratio.

    For a parameter p with gradient g (except 1-D parameters when `exclude_bias_n_norm`, which take a
    plain momentum step without weight decay), if ‖p‖ ≠ 0 and ‖g‖ ≠ 0:
        r = eta·‖p‖ / (‖g‖ + wd·‖p‖ + 1e-8);  with clip_lr: r = min(r / lr, 1);  d = (g + wd·p)·r
    else d = g. Then buf = momentum·buf + d (buf starts as the first d) and p −= lr·buf.
    """

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, eta: float, clip_lr: bool,
                 exclude_bias_n_norm: bool, eps: float = 1e-8):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip_lr=clip_lr,
                        exclude_bias_n_norm=exclude_bias_n_norm, eps=eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)

    def _update(self, p: Tensor, group: dict) -> None:
        d = p.grad
        if p.ndim != 1 or not group["exclude_bias_n_norm"]:
            p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
            ratio = group["eta"] * p_norm / (g_norm + group["weight_decay"] * p_norm + group["eps"])
            if group["clip_lr"]:
                ratio = torch.clamp(ratio / group["lr"], max=1.0)
            scaled = (d + group["weight_decay"] * p) * ratio
            d = torch.where((p_norm != 0) & (g_norm != 0), scaled, d)  # on the device: no host sync per parameter
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = d.detach().clone()
        else:
            state["momentum_buffer"].mul_(group["momentum"]).add_(d)
        p.add_(state["momentum_buffer"], alpha=-group["lr"])


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, start_lr: float) -> float:
    """Linear from `start_lr` to `base_lr` over `warmup_steps`, then cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return start_lr + step * (base_lr - start_lr) / max(warmup_steps - 1, 1)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))
