"""The self-supervised losses (docs/method.md sections 3.1 and 3.2), as pure functions of the two views.

Under `torch.distributed` both follow the reference code: SimCLR gathers the keys of every rank with
an autograd-aware all_gather (queries stay local), Barlow Twins averages the cross-correlation
matrix over ranks.
"""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor

from pipeline.runtime import world_size


def nt_xent(z_a: Tensor, z_b: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent: −mean over the 2N anchors of log(pos / (pos + Σ neg)), similarities cos/τ.

    The positive of an anchor is the other view of its image; every view of every other image is a
    negative; the anchor itself is neither.
    """
    n = z_a.shape[0]
    queries = F.normalize(torch.cat([z_a, z_b]), dim=1)  # (2n, D)
    keys, offset = queries, 0
    if world_size() > 1:  # keys of all ranks, each rank's block laid out as [its z_a; its z_b]
        keys = torch.cat(dist_nn.all_gather(queries))  # (2N, D)
        offset = dist.get_rank() * 2 * n
    logits = queries @ keys.T / temperature  # (2n, 2N)
    anchors = torch.arange(2 * n, device=z_a.device)
    itself = torch.arange(len(keys), device=z_a.device)[None, :] == (anchors + offset)[:, None]  # (2n, 2N)
    logits = logits.masked_fill(itself, float("-inf"))  # an anchor is not its own negative
    positives = (anchors + n) % (2 * n) + offset
    return F.cross_entropy(logits, positives)


def barlow_twins(z_a: Tensor, z_b: Tensor, offdiag_weight: float = 0.0051, scale: float = 0.1) -> Tensor:
    """scale · [Σ_i (1 − c_ii)² + offdiag_weight · Σ_{i≠j} c_ij²], c = BN(z_a)ᵀ BN(z_b) / N.

    BN is a parameter-free batch normalization with batch statistics. Under DDP, c is all-reduced and
    divided by the world size as in the reference, so gradients are 1/world_size of a single process's.
    """
    n = z_a.shape[0]
    c = _batch_norm(z_a).T @ _batch_norm(z_b) / n  # (D, D)
    if world_size() > 1:
        c = c.clone()
        dist.all_reduce(c)  # not autograd-aware, as in the reference: gradients flow through the local c
        c = c / world_size()
    on_diag = (1 - c.diagonal()).pow(2).sum()
    off_diag = c.pow(2).sum() - c.diagonal().pow(2).sum()
    return scale * (on_diag + offdiag_weight * off_diag)


def _batch_norm(z: Tensor) -> Tensor:
    return F.batch_norm(z, None, None, training=True, eps=1e-5)
