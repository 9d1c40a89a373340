import math
from functools import partial

import pytest
import torch

from pipeline.losses import barlow_twins, nt_xent


def nt_xent_by_hand(z_a, z_b, temperature):
    """docs/method.md 3.1 written out anchor by anchor."""
    z = torch.nn.functional.normalize(torch.cat([z_a, z_b]), dim=1).double()
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        p = (i + n2 // 2) % n2
        sim = lambda k, i=i: math.exp(float(z[i] @ z[k]) / temperature)  # noqa: E731
        negatives = sum(sim(k) for k in range(n2) if k not in (i, p))
        total += -math.log(sim(p) / (sim(p) + negatives))
    return total / n2


def test_nt_xent_matches_reference():
    """float32 against float64. Each logit cos/τ (|·| ≤ 5) is off by a few float32 unit roundoffs u = 6e-8 times
    its size, and log-sum-exp over 11 terms keeps that absolute error: ~1e-6 on a loss of ~2, so rel 1e-5 holds
    with a factor > 10 on any CPU."""
    torch.manual_seed(0)
    z_a, z_b = torch.randn(6, 5), torch.randn(6, 5)
    assert nt_xent(z_a, z_b, 0.2).item() == pytest.approx(nt_xent_by_hand(z_a, z_b, 0.2), rel=1e-5)


def test_nt_xent_of_identical_embeddings_is_log_2n_minus_1():
    z = torch.ones(8, 4)
    assert nt_xent(z, z, 0.5).item() == pytest.approx(math.log(2 * 8 - 1), rel=1e-6)


def test_nt_xent_is_scale_invariant_and_small_for_matched_distinct_views():
    torch.manual_seed(1)
    z = torch.eye(16)[:8] * 3
    assert nt_xent(z, 5 * z, 0.1).item() < 1e-3  # positives aligned, negatives orthogonal
    z_a, z_b = torch.randn(4, 3), torch.randn(4, 3)
    assert nt_xent(z_a, z_b, 0.2).item() == pytest.approx(nt_xent(7 * z_a, 0.5 * z_b, 0.2).item(), rel=1e-5)


def barlow_by_hand(z_a, z_b, offdiag_weight, scale):
    """docs/method.md 3.2 in float64."""
    z_a, z_b = z_a.double(), z_b.double()

    def standardize(z):
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)

    c = standardize(z_a).T @ standardize(z_b) / len(z_a)
    off = c - torch.diag(torch.diag(c))
    return scale * (((1 - torch.diag(c)) ** 2).sum() + offdiag_weight * (off**2).sum())


def test_barlow_twins_matches_reference():
    """float32 against float64: c's entries are means of 32 products of standardized values (|·| ≲ 3), each off by
    ≲ 32·u·9 ≈ 2e-5 at worst (u = 6e-8); the loss sums 49 squares of terms ≤ 1 + |c|, so its relative error
    stays below 1e-4, the bound used."""
    torch.manual_seed(0)
    z_a, z_b = torch.randn(32, 7), torch.randn(32, 7)
    for offdiag_weight, scale in ((0.0051, 0.1), (0.5, 2.0)):
        loss = barlow_twins(z_a, z_b, offdiag_weight=offdiag_weight, scale=scale).double()
        torch.testing.assert_close(loss, barlow_by_hand(z_a, z_b, offdiag_weight, scale), rtol=1e-4, atol=0)


def test_barlow_twins_is_affine_invariant_per_feature():
    """Exact but for batch norm's ε = 1e-5 under a scale in [0.5, 3.5] (var ≈ 1): the standardized values change by
    ≲ ε/var ≈ 1e-5 relatively, hence rtol 1e-4 (float32 roundoff is 100 times smaller)."""
    torch.manual_seed(2)
    z_a, z_b = torch.randn(64, 5), torch.randn(64, 5)
    scale, shift = torch.rand(5) * 3 + 0.5, torch.randn(5)
    torch.testing.assert_close(barlow_twins(z_a * scale + shift, z_b), barlow_twins(z_a, z_b), rtol=1e-4, atol=1e-5)


def test_barlow_twins_of_identical_decorrelated_views_is_near_zero():
    z = torch.linalg.qr(torch.randn(256, 8))[0] * 16  # orthogonal, zero-mean-ish columns
    z = z - z.mean(0)
    assert barlow_twins(z, z).item() < 1e-2


@pytest.mark.parametrize("loss", [partial(nt_xent, temperature=0.2), barlow_twins], ids=["nt_xent", "barlow_twins"])
def test_losses_of_bf16_views_under_autocast_are_their_float32_losses(loss):
    """Regression (issue 18, item 5): under bf16 autocast the losses ran bf16 matmuls (Barlow Twins' c, resolved to
    ~0.002 near its diagonal of 1; SimCLR's logits). Now the float32 loss of the same values, bit for bit."""
    generator = torch.Generator().manual_seed(0)
    z_a, z_b = (torch.randn(32, 16, generator=generator).bfloat16() for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(z_a, z_b)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, loss(z_a.float(), z_b.float()))
