import math

import pytest
import torch

from pipeline.projectors import HEADS, Projector, SparseAutoencoder, quantize


@pytest.mark.parametrize("levels", [2, 3, 4, 5, 30])
def test_quantizer_has_levels_values(levels):
    z = torch.linspace(-20, 20, 20001)
    values = torch.unique(quantize(z, levels))
    assert len(values) == levels
    assert values.min() >= -1 and values.max() <= 1


def test_quantizer_with_3_levels_gives_minus_one_zero_one():
    assert torch.unique(quantize(torch.randn(1000) * 5, 3)).tolist() == [-1.0, 0.0, 1.0]


def test_quantizer_formula_and_straight_through_gradient():
    z = torch.randn(50, requires_grad=True)
    levels = 4
    half, offset = 3 * 0.999 / 2, 0.5
    bounded = torch.tanh(z + math.tan(offset / half)) * half - offset
    torch.testing.assert_close(quantize(z, levels), torch.round(bounded) / 2)
    quantize(z, levels).sum().backward()
    expected = (1 - torch.tanh(z + math.tan(offset / half)) ** 2) * half / 2  # d(bounded / 2)/dz
    torch.testing.assert_close(z.grad, expected.detach())


def test_quantizer_off_and_invalid():
    z = torch.randn(5)
    assert quantize(z, 0) is z
    with pytest.raises(ValueError, match="levels must be 0"):
        quantize(z, 1)


def test_sae_keeps_exactly_k_latents_and_adds_pre_bias():
    torch.manual_seed(0)
    sae = SparseAutoencoder(6, 40, topk=5)
    with torch.no_grad():
        sae.pre_bias.copy_(torch.randn(6))
    x = torch.randn(9, 6)
    latents = torch.relu(sae.encoder(x - sae.pre_bias))
    kept = torch.zeros_like(latents)
    for i in range(9):  # the 5 largest of each row, by a sort
        order = latents[i].argsort(descending=True)[:5]
        kept[i, order] = latents[i, order]
    assert ((kept > 0).sum(1) <= 5).all()
    torch.testing.assert_close(sae(x), sae.decoder(kept) + sae.pre_bias)


def test_sae_topk_must_fit_latent_dim():
    with pytest.raises(ValueError, match="sae_topk must be in 1..sae_latent_dim=10"):
        SparseAutoencoder(4, 10, 11)


@pytest.mark.parametrize("method", sorted(HEADS))
@pytest.mark.parametrize("sae, levels", [(None, 0), (None, 3), ((64, 8), 0), ((64, 8), 30)])
def test_every_projector_variant_has_shapes_and_gradients(method, sae, levels):
    torch.manual_seed(0)
    projector = Projector(HEADS[method](32, 48, 16, sae), levels)
    z = projector(torch.randn(10, 32))
    expected_dim = 16 if sae is None else (32 if method == "simclr" else 48)
    assert z.shape == (10, expected_dim) and torch.isfinite(z).all()
    (z * torch.randn_like(z)).sum().backward()
    for name, parameter in projector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
