"""SGD with momentum, LARS, and the warmup-cosine schedule of docs/method.md section 4 (solo-learn's semantics).

Plain classes with torch.optim's interface as this project uses it (param_groups, zero_grad, step,
state_dict, load_state_dict), not subclasses of torch.optim.Optimizer: its methods import torch._dynamo,
which costs every stage process about 3 s of start-up on the 2-core machine.

A step updates all the parameters of a group together with `torch._foreach_*` ops (one fused kernel each on a
GPU) instead of a Python loop of ~10 kernels per parameter tensor: a step of the paper's models has ~70 tensors,
and with 32-px batches the host launching kernels was the bottleneck. On a CPU the foreach ops run the same
per-tensor ops as such a loop, in the same order: the numbers are those of the loop, bit for bit.
"""

import math
from collections.abc import Iterable

import torch
from torch import Tensor


class SGD:
    """Momentum SGD as torch.optim.SGD (dampening 0, not Nesterov): d = g + wd·p; buf = momentum·buf + d
    (buf starts as the first d); p −= lr·buf. `params` are tensors or groups (dicts with "params")."""

    def __init__(self, params: Iterable, lr: float, momentum: float, weight_decay: float, **options):
        groups = list(params)
        if not groups or not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay} | options
        self.param_groups = [defaults | group | {"params": list(group["params"])} for group in groups]
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._parameters():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._momentum_step(params, self.directions(params, group), group)

    def directions(self, params: list[Tensor], group: dict) -> list[Tensor]:
        """d per parameter (each has a gradient): g + wd·p."""
        if not group["weight_decay"]:
            return [_grad(p) for p in params]
        return _decayed(params, group["weight_decay"])

    def _momentum_step(self, params: list[Tensor], directions: list[Tensor], group: dict) -> None:
        """buf = momentum·buf + d (buf starts as the first d); p −= lr·buf."""
        first = [p not in self.state for p in params]
        pairs = [(self.state[p]["momentum_buffer"], d) for p, d, new in zip(params, directions, first) if not new]
        if pairs:
            buffers, updates = zip(*pairs)
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
        for p, d, new in zip(params, directions, first):
            if new:
                self.state[p] = {"momentum_buffer": d.detach().clone()}
        torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params], alpha=-group["lr"])

    def state_dict(self) -> dict:
        """Parameters by index, as torch.optim: loadable into an optimizer over the same parameters."""
        index = {p: i for i, p in enumerate(self._parameters())}
        return {
            "state": {index[p]: dict(s) for p, s in self.state.items()},
            "param_groups": [
                {k: v for k, v in g.items() if k != "params"} | {"params": [index[p] for p in g["params"]]}
                for g in self.param_groups
            ],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        parameters = self._parameters()
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state = {
            parameters[i]: {k: v.to(parameters[i].device) for k, v in s.items()} for i, s in state_dict["state"].items()
        }

    def _parameters(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]


class LARS(SGD):
    """SGD with momentum whose update is scaled per parameter by a trust ratio.

    For a parameter p with gradient g (except 1-D parameters when `exclude_bias_n_norm`, which take a
    plain momentum step without weight decay), if ‖p‖ ≠ 0 and ‖g‖ ≠ 0:
        r = eta·‖p‖ / (‖g‖ + wd·‖p‖ + 1e-8);  with clip_lr: r = min(r / lr, 1);  d = (g + wd·p)·r
    else d = g. Then buf = momentum·buf + d (buf starts as the first d) and p −= lr·buf.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float,
        weight_decay: float,
        eta: float,
        clip_lr: bool,
        exclude_bias_n_norm: bool,
        eps: float = 1e-8,
    ):
        super().__init__(
            params,
            lr,
            momentum,
            weight_decay,
            eta=eta,
            clip_lr=clip_lr,
            exclude_bias_n_norm=exclude_bias_n_norm,
            eps=eps,
        )

    def directions(self, params: list[Tensor], group: dict) -> list[Tensor]:
        """The class docstring's d for every parameter of `group` at once."""
        excluded = [p.ndim == 1 and group["exclude_bias_n_norm"] for p in params]
        scaled = iter(_trust_scaled([p for p, skip in zip(params, excluded) if not skip], group))
        return [_grad(p) if skip else next(scaled) for p, skip in zip(params, excluded)]


def _trust_scaled(params: list[Tensor], group: dict) -> list[Tensor]:
    """(g + wd·p)·r for each parameter: norms and updates as foreach ops, the trust ratios r as one (P,) vector
    on the device (no host sync)."""
    if not params:
        return []
    p_norm = torch.stack(torch._foreach_norm(params))  # (P,)
    g_norm = torch.stack(torch._foreach_norm([_grad(p) for p in params]))
    ratio = group["eta"] * p_norm / (g_norm + group["weight_decay"] * p_norm + group["eps"])
    if group["clip_lr"]:
        ratio = torch.clamp(ratio / group["lr"], max=1.0)
    # d = g where a norm is 0: ‖p‖ = 0 means p = 0, so (g + wd·p)·1 = g; ‖g‖ = 0 means g = 0 = (g + wd·p)·0
    ratio = torch.where(p_norm == 0, 1.0, torch.where(g_norm == 0, 0.0, ratio))
    updates = _decayed(params, group["weight_decay"])
    torch._foreach_mul_(updates, list(ratio.unbind()))  # each tensor by its own ratio
    return updates


def _grad(p: Tensor) -> Tensor:
    assert p.grad is not None, "step() skips parameters without a gradient"
    return p.grad


def _decayed(params: list[Tensor], weight_decay: float) -> list[Tensor]:
    """g + wd·p for each parameter, as new tensors (wd·p + g: the same rounding as g + wd·p)."""
    updates = list(torch._foreach_mul(params, weight_decay))
    torch._foreach_add_(updates, [_grad(p) for p in params])
    return updates


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, start_lr: float) -> float:
    """Linear from `start_lr` to `base_lr` over `warmup_steps`, then cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return start_lr + step * (base_lr - start_lr) / max(warmup_steps - 1, 1)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))
