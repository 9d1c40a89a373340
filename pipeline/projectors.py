"""Projection heads: the baselines (docs/method.md 3.6) and the paper's modifications (3.4, 3.5).

A projector is a head (MLP or sparse autoencoder) followed by the optional quantizer:
projector/SAE -> quantizer -> (the regularizer sees the quantized output).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity backward (straight-through)."""
    return x + (torch.round(x) - x).detach()


def quantize(z: Tensor, levels: int) -> Tensor:
    """FSQ-style discretization to `levels` (L) values per dimension in [−1, 1]; L = 0 disables it."""
    if levels == 0:
        return z
    if levels < 2:
        raise ValueError(f"levels must be 0 (off) or >= 2, got {levels}")
    half = (levels - 1) * (1 - 1e-3) / 2
    offset = 0.5 if levels % 2 == 0 else 0.0
    shift = math.tan(offset / half)
    bounded = torch.tanh(z + shift) * half - offset
    return round_ste(bounded) / (levels // 2)


class SparseAutoencoder(nn.Module):
    """x -> W_dec · topk(ReLU(W_enc (x − b_pre) + b_enc)) + b_dec + b_pre, keeping the k largest latents.

    Trained by the SSL objective only (no reconstruction or sparsity loss).
    """

    def __init__(self, in_dim: int, latent_dim: int, topk: int):
        super().__init__()
        if not 1 <= topk <= latent_dim:
            raise ValueError(f"sae_topk must be in 1..sae_latent_dim={latent_dim}, got {topk}")
        self.encoder = nn.Linear(in_dim, latent_dim)
        self.decoder = nn.Linear(latent_dim, in_dim)
        self.pre_bias = nn.Parameter(torch.zeros(in_dim))
        self.topk = topk

    def forward(self, x: Tensor) -> Tensor:
        latents = F.relu(self.encoder(x - self.pre_bias))  # (N, d)
        values, indices = latents.topk(self.topk, dim=1)
        return self.decoder(torch.zeros_like(latents).scatter(1, indices, values)) + self.pre_bias


class Projector(nn.Module):
    def __init__(self, head: nn.Module, levels: int):
        super().__init__()
        quantize(torch.zeros(1), levels)  # refuse an invalid level count now, not at the first step
        self.head, self.levels = head, levels

    def forward(self, h: Tensor) -> Tensor:
        return quantize(self.head(h), self.levels)


def simclr_head(in_dim: int, hidden_dim: int, out_dim: int, sae: tuple[int, int] | None) -> nn.Module:
    """Linear–ReLU–Linear, no BN; the sparse autoencoder (latent dim, top-k) replaces it on the features."""
    if sae:
        return SparseAutoencoder(in_dim, *sae)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def barlow_twins_head(in_dim: int, hidden_dim: int, out_dim: int, sae: tuple[int, int] | None) -> nn.Module:
    """(Linear–BN–ReLU) × 2 then Linear; with a sparse autoencoder, the first block then the SAE."""
    first = [nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
    if sae:
        return nn.Sequential(*first, SparseAutoencoder(hidden_dim, *sae))
    return nn.Sequential(
        *first,
        nn.Linear(hidden_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


HEADS: dict[str, Callable[..., nn.Module]] = {"simclr": simclr_head, "barlow_twins": barlow_twins_head}
