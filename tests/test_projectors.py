import math

import pytest
import torch
from torch import nn

from pipeline.params import BASELINE_HEADS, VariantParams
from pipeline.projectors import Projector, SparseAutoencoder, build_head, quantize
from pipeline.run import Variant


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


SHAPES = [  # (layers, batch_norm, sae): every kind of projector a variant can ask for
    (layers, batch_norm, sae)
    for layers in range(5)
    for batch_norm in (False, True)
    for sae in (None, (64, 8))
    if layers >= 2 or (sae is None and not batch_norm)
]


@pytest.mark.parametrize("layers, batch_norm, sae", SHAPES)
@pytest.mark.parametrize("levels", [0, 3])
def test_every_projector_has_shapes_and_gradients(layers, batch_norm, sae, levels):
    torch.manual_seed(0)
    projector = Projector(build_head(32, layers, 48, 16, batch_norm, sae), levels)
    h = torch.randn(10, 32, requires_grad=True)
    z = projector(h)
    width = 32 if layers == 0 or (sae and layers == 2) else 48 if sae else 16  # an SAE keeps its input's width
    assert z.shape == (10, width) and torch.isfinite(z).all()
    (z * torch.randn_like(z)).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0  # the encoder is trained through it
    for name, parameter in projector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def heads_before_projector_knobs(method: str, in_dim: int, hidden: int, out: int, sae) -> nn.Module:
    """simclr_head and barlow_twins_head as they were before variants could shape the projector (commit 2912e5e)."""
    if method == "simclr":
        if sae:
            return SparseAutoencoder(in_dim, *sae)
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))
    first = [nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
    if sae:
        return nn.Sequential(*first, SparseAutoencoder(hidden, *sae))
    return nn.Sequential(
        *first, nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)
    )


@pytest.mark.parametrize("method", sorted(BASELINE_HEADS))
@pytest.mark.parametrize("knobs", [{}, {"sae_latent_dim": 128, "sae_topk": 64}, {"levels": 100}])
def test_default_variants_build_the_same_modules_as_before(params, method, knobs):
    """The committed variants, which give no projector knobs, keep their heads: same modules, parameter names and
    shapes, and from one seed the same initial weights (so their runs are unchanged)."""
    common = getattr(params.pretrain.synthetic, method).common
    variant = Variant.from_params("v", VariantParams(**knobs), common, method)
    torch.manual_seed(0)
    new = build_head(
        32,
        variant.projector_layers,
        variant.projector_hidden_dim,
        variant.projector_out_dim,
        variant.projector_batch_norm,
        variant.sae,
    )
    torch.manual_seed(0)
    old = heads_before_projector_knobs(method, 32, common.projector_hidden_dim, common.projector_out_dim, variant.sae)
    assert repr(new) == repr(old)
    assert new.state_dict().keys() == old.state_dict().keys()
    for name, tensor in old.state_dict().items():
        assert torch.equal(new.state_dict()[name], tensor), name


def test_a_variant_shapes_its_projector_and_keeps_the_rest_of_the_baseline(params):
    common = params.pretrain.synthetic.barlow_twins.common
    variant = Variant.from_params("v", VariantParams(projector_layers=2, projector_out_dim=8), common, "barlow_twins")
    head = build_head(
        32, 2, variant.projector_hidden_dim, variant.projector_out_dim, variant.projector_batch_norm, None
    )
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (head[0].out_features, head[3].out_features) == (common.projector_hidden_dim, 8)
