"""Projection heads: the baselines (docs/method.md 3.6) and the paper's modifications (3.4, 3.5).

A projector is a head (MLP or sparse autoencoder) followed by the optional quantizer:
projector/SAE -> quantizer -> (the regularizer sees the quantized output).
"""

import math

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


def build_head(
    in_dim: int, layers: int, hidden_dim: int, out_dim: int, batch_norm: bool, sae: tuple[int, int] | None
) -> nn.Module:
    """(Linear–[BN]–ReLU) × (layers − 1), then Linear(·, out_dim): the baselines' heads (docs/method.md 3.6) are
    SimCLR's 2 layers without BN and Barlow Twins' 3 with BN; 1 layer is linear, 0 none (z = h). A sparse
    autoencoder (latent dim, top-k) replaces the last two linear layers: SimCLR's then acts on the features,
    Barlow Twins' on its first block's output (3.5)."""
    if layers == 0:
        return nn.Identity()
    blocks: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 2 if sae else layers - 1):
        blocks += [
            nn.Linear(width, hidden_dim),
            *([nn.BatchNorm1d(hidden_dim)] if batch_norm else []),
            nn.ReLU(inplace=True),
        ]
        width = hidden_dim
    if sae:
        autoencoder = SparseAutoencoder(width, *sae)
        return nn.Sequential(*blocks, autoencoder) if blocks else autoencoder
    return nn.Sequential(*blocks, nn.Linear(width, out_dim))
