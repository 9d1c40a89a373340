"""The self-supervised losses (docs/method.md sections 3.1 and 3.2), as pure functions of the two views.

Both are computed in float32 (or the views' wider type) with autocast off, whatever precision the model ran in:
Barlow Twins' cross-correlation (diagonal near 1) and SimCLR's logits lose too much in bf16. Under
`torch.distributed` both follow the reference code: SimCLR gathers the keys of every rank with an autograd-aware
all_gather (queries stay local), Barlow Twins averages the cross-correlation matrix over ranks; `distributed=False`
gives the loss of the given tensors alone (e.g. views already gathered from every rank).
"""

import functools
from collections.abc import Callable
from typing import Concatenate, ParamSpec

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.distributed import all_gather, rank, sum_over_ranks
from pipeline.runtime import world_size

P = ParamSpec("P")
Views = Callable[Concatenate[Tensor, Tensor, P], Tensor]  # a function of the two views (and other arguments)


def _in_float32(loss: Views[P]) -> Views[P]:
    """`loss` of the views upcast to float32 (float64 stays), with autocast off."""

    @functools.wraps(loss)
    def wrapped(z_a: Tensor, z_b: Tensor, *args: P.args, **kwargs: P.kwargs) -> Tensor:
        wide = torch.promote_types(z_a.dtype, torch.float32)
        with torch.autocast(z_a.device.type, enabled=False):
            return loss(z_a.to(wide), z_b.to(wide), *args, **kwargs)

    return wrapped


@_in_float32
def nt_xent(z_a: Tensor, z_b: Tensor, temperature: float, distributed: bool = True) -> Tensor:
    """SimCLR's NT-Xent: −mean over the 2N anchors of log(pos / (pos + Σ neg)), similarities cos/τ.

    The positive of an anchor is the other view of its image; every view of every other image is a
    negative; the anchor itself is neither.
    """
    n = z_a.shape[0]
    queries = F.normalize(torch.cat([z_a, z_b]), dim=1)  # (2n, D)
    keys, offset = queries, 0
    if distributed and world_size() > 1:  # keys of all ranks, each rank's block laid out as [its z_a; its z_b]
        keys = all_gather(queries)  # (2N, D)
        offset = rank() * 2 * n
    logits = queries @ keys.T / temperature  # (2n, 2N)
    anchors = torch.arange(2 * n, device=z_a.device)
    itself = torch.arange(len(keys), device=z_a.device)[None, :] == (anchors + offset)[:, None]  # (2n, 2N)
    logits = logits.masked_fill(itself, float("-inf"))  # an anchor is not its own negative
    positives = (anchors + n) % (2 * n) + offset
    return F.cross_entropy(logits, positives)


@_in_float32
def barlow_twins(
    z_a: Tensor, z_b: Tensor, offdiag_weight: float = 0.0051, scale: float = 0.1, distributed: bool = True
) -> Tensor:
    """scale · [Σ_i (1 − c_ii)² + offdiag_weight · Σ_{i≠j} c_ij²], c = BN(z_a)ᵀ BN(z_b) / N.

    BN is a parameter-free batch normalization with batch statistics (each rank's own, as the reference). Under
    DDP, c is the mean of the ranks' c as in the reference, and its gradient flows through the local c only, so
    gradients are 1/world_size of a single process's. The collective runs outside autograd (a detached sum, plus
    the local c's zero-valued difference from itself, which carries the gradient).
    """
    n = z_a.shape[0]
    c = _batch_norm(z_a).T @ _batch_norm(z_b) / n  # (D, D)
    if distributed and world_size() > 1:
        c = (sum_over_ranks(c) + (c - c.detach())) / world_size()
    on_diag = (1 - c.diagonal()).pow(2).sum()
    off_diag = c.pow(2).sum() - c.diagonal().pow(2).sum()
    return scale * (on_diag + offdiag_weight * off_diag)


def _batch_norm(z: Tensor) -> Tensor:
    return F.batch_norm(z, None, None, training=True, eps=1e-5)
