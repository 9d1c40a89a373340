"""SGD with momentum, LARS, and the warmup-cosine schedule of docs/method.md section 4 (solo-learn's semantics).

Plain classes with torch.optim's interface as this project uses it (param_groups, zero_grad, step,
state_dict, load_state_dict), not subclasses of torch.optim.Optimizer: its methods import torch._dynamo,
which costs every stage process about 3 s of start-up on the 2-core machine.
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
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = self.direction(p, group)
                state = self.state.setdefault(p, {})
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.detach().clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])

    def direction(self, p: Tensor, group: dict) -> Tensor:
        assert p.grad is not None, "step() skips parameters without a gradient"
        return p.grad + group["weight_decay"] * p if group["weight_decay"] else p.grad

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

    def direction(self, p: Tensor, group: dict) -> Tensor:
        d = p.grad
        assert d is not None, "step() skips parameters without a gradient"
        if p.ndim == 1 and group["exclude_bias_n_norm"]:
            return d
        p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
        ratio = group["eta"] * p_norm / (g_norm + group["weight_decay"] * p_norm + group["eps"])
        if group["clip_lr"]:
            ratio = torch.clamp(ratio / group["lr"], max=1.0)
        scaled = (d + group["weight_decay"] * p) * ratio
        return torch.where((p_norm != 0) & (g_norm != 0), scaled, d)  # on the device: no host sync per parameter


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, start_lr: float) -> float:
    """Linear from `start_lr` to `base_lr` over `warmup_steps`, then cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return start_lr + step * (base_lr - start_lr) / max(warmup_steps - 1, 1)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))
