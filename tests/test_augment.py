"""Augmentations against torchvision's functional ops, image by image, and the CPU kernel against the torch ops.

Tolerances: pixel values are in [0, 1] and every op is a short weighted sum, so two float32 implementations that
order the same arithmetic differently differ by a few unit roundoffs (u = 6e-8) per term: a resized crop sums
2 × 4 bicubic taps (weights' absolute sum ≤ 1.3, antialiasing adds taps only when downscaling): ≲ 16·u·1.3 ≈ 1.3e-6,
under 2e-6; colour jitter chains 4 ops with clamps (1-Lipschitz) and an HSV round trip: ≲ 1e-5. The numba kernel
against the torch ops runs the whole chain (crop, jitter, grayscale, 13-tap blur, solarize at 0.5, where it is
continuous, then ÷ std ≥ 0.2): ≲ 50·u·5 ≈ 1.5e-5, and 2e-4 leaves a factor > 10 whatever the CPU."""

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from pipeline.augment import (
    ViewSpec,
    adjust_hue,
    augment,
    augment_numba,
    augment_torch,
    color_jitter,
    draw,
    gaussian_blur,
    grayscale,
    resized_crop,
    solarize,
)

MEAN, STD = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
PAPER = {
    "crop_scale": (0.08, 1.0),
    "crop_ratio": (3 / 4, 4 / 3),
    "flip_p": 0.5,
    "jitter_p": 0.8,
    "grayscale_p": 0.2,
    "blur_sigma": (0.1, 2.0),
}
SYMMETRIC = ViewSpec(
    32, True, jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5, solarize_p=0.0, interpolation="bicubic", **PAPER
)
SOLARIZING = ViewSpec(
    32, True, jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.0, solarize_p=0.2, interpolation="bilinear", **PAPER
)
# ImageNet-100's views (docs/method.md section 4): 224 px, cropped by the FFCV decoder (crop=False here)
IMAGENET_SYMMETRIC = ViewSpec(
    224, False, jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5, solarize_p=0.0, interpolation="bicubic", **PAPER
)
IMAGENET_B = ViewSpec(
    224, False, jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarize_p=0.2, interpolation="bicubic", **PAPER
)


def images(b=16, size=32, seed=0):
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resized_crop_matches_torchvision(interpolation):
    x = torch.rand(5, 3, 32, 32)
    boxes = torch.tensor([[0, 0, 32, 32], [3, 7, 20, 12], [5, 2, 9, 25], [10, 1, 14, 14], [30, 30, 2, 2]])
    flip = torch.tensor([False, True, False, True, True])
    out = resized_crop(x, *boxes.unbind(1), flip, 32, interpolation)
    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    for k, (top, left, h, w) in enumerate(boxes.tolist()):
        expected = TF.resized_crop(x[k], top, left, h, w, [32, 32], mode, antialias=True)
        torch.testing.assert_close(out[k], TF.hflip(expected) if flip[k] else expected, atol=2e-6, rtol=0)


def test_color_jitter_matches_torchvision_in_each_order():
    x = torch.rand(6, 3, 32, 32)
    factors = torch.tensor([[1.5, 0.6, 1.7, 0.15], [0.3, 1.8, 0.2, -0.2], [1.0, 1.0, 1.0, 0.0]] * 2)
    order = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(k)) for k in range(6)])
    out = color_jitter(x.clone(), factors, order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for k in range(6):
        expected = x[k]
        for op_index in order[k].tolist():
            expected = ops[op_index](expected, float(factors[k, op_index]))
        torch.testing.assert_close(out[k], expected, atol=1e-5, rtol=0)


def test_hue_shift_of_gray_is_gray_and_full_turn_is_identity():
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(adjust_hue(x, torch.tensor([0.5, -0.5]) * 2), x, atol=1e-5, rtol=0)
    gray = x[:, :1].expand(-1, 3, -1, -1)
    torch.testing.assert_close(adjust_hue(gray, torch.tensor([0.3, 0.1])), gray, atol=1e-6, rtol=0)


def test_gaussian_blur_matches_torchvision_per_sigma():
    x = torch.rand(4, 3, 32, 32)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    out = gaussian_blur(x, sigma, 13)
    for k in range(4):
        torch.testing.assert_close(out[k], TF.gaussian_blur(x[k], [13, 13], [float(sigma[k])] * 2), atol=2e-6, rtol=0)


@pytest.mark.parametrize("spec", [SYMMETRIC, SOLARIZING], ids=["symmetric", "asymmetric-b"])
def test_cpu_kernel_matches_torch_ops(spec):
    x = images(64)
    d = draw(64, (32, 32), spec, torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        augment_numba(x, spec, d, MEAN, STD), augment_torch(x, spec, d, MEAN, STD), atol=2e-4, rtol=0
    )


def test_cpu_kernel_reads_channels_last_batches():
    x = images(8)
    d = draw(8, (32, 32), SYMMETRIC, torch.Generator().manual_seed(4))
    channels_last = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # how FFCV hands batches over
    torch.testing.assert_close(
        augment_numba(channels_last, SYMMETRIC, d, MEAN, STD), augment_numba(x.contiguous(), SYMMETRIC, d, MEAN, STD)
    )


def test_parameters_are_drawn_per_sample_and_reproducibly():
    x = images(1).expand(256, -1, -1, -1).contiguous()  # one image, 256 times
    view_a = augment(x, SYMMETRIC, MEAN, STD, torch.Generator().manual_seed(0))
    view_b = augment(x, SYMMETRIC, MEAN, STD, torch.Generator().manual_seed(1))
    assert len({tuple(v.flatten()[:50].tolist()) for v in view_a}) == 256  # every sample its own draw
    assert not torch.allclose(view_a, view_b)
    torch.testing.assert_close(augment(x, SYMMETRIC, MEAN, STD, torch.Generator().manual_seed(0)), view_a)


def test_probabilities_are_respected():
    d = draw(20000, (32, 32), SYMMETRIC, torch.Generator().manual_seed(5))
    rates = torch.cat([d.flip[:, None], d.apply], 1).float().mean(0)
    torch.testing.assert_close(rates, torch.tensor([0.5, 0.8, 0.2, 0.5, 0.0]), atol=0.015, rtol=0)
    area = (d.boxes[:, 2] * d.boxes[:, 3]).float() / 1024
    assert area.min() >= 0.08 - 0.02 and area.max() <= 1.0
    assert d.factors[:, 3].abs().max() <= 0.2 and d.factors[:, :3].min() >= 0.2 and d.factors[:, :3].max() <= 1.8


def augment_as_before(x, spec, d, mean, std):
    """augment_torch before issue 18 item 10: the resize always (the identity, or the mirror, when the decoder
    had cropped), every colour-jitter op computed at each of the four steps, every op whatever its probability."""

    def blend(y, other, f):
        f = f.view(-1, 1, 1, 1)
        return (f * y + (1 - f) * other).clamp_(0, 1)

    def where(mask, done, y):
        return torch.where(mask.view(-1, 1, 1, 1), done, y)

    ops = (
        lambda y, f: blend(y, torch.zeros_like(y), f),
        lambda y, f: blend(y, grayscale(y).mean((1, 2, 3), keepdim=True), f),
        lambda y, f: blend(y, grayscale(y), f),
        adjust_hue,
    )
    x = resized_crop(x.float() / 255, *d.boxes.unbind(1), d.flip, spec.size, spec.interpolation).clamp_(0, 1)
    jittered = x
    for step in range(4):
        for op_index, op in enumerate(ops):
            jittered = where(d.order[:, step] == op_index, op(jittered, d.factors[:, op_index]), jittered)
    x = where(d.apply[:, 0], jittered, x)
    x = where(d.apply[:, 1], grayscale(x), x)
    x = where(d.apply[:, 2], gaussian_blur(x, d.sigma, spec.blur_size), x)
    x = where(d.apply[:, 3], solarize(x), x)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


@pytest.mark.parametrize(
    "spec, b",
    [(SYMMETRIC, 64), (SOLARIZING, 64), (IMAGENET_SYMMETRIC, 8), (IMAGENET_B, 8)],
    ids=["32px-symmetric", "32px-asymmetric-b", "224px-symmetric", "224px-asymmetric-b"],
)
def test_device_augmentation_equals_what_it_computed_before(spec, b):
    """Issue 18 item 10 made the torch path cheaper (no identity resize; one blend per jitter step and one hue
    shift instead of all four ops at all four steps; no op of probability 0) without changing what a sample
    gets: the same ops in the same order on the same values (the resize matrices of an uncropped image are
    exactly 0 and 1; a reduction per sample sees the same shape), so the output is equal bit for bit."""
    x = images(b, spec.size)
    d = draw(b, (spec.size, spec.size), spec, torch.Generator().manual_seed(6))
    assert d.apply[:, 0].any() and (d.order[:, 0] == 3).any() and (d.order[:, 3] == 3).any() and d.flip.any()
    expected = augment_as_before(x, spec, d, MEAN, STD)
    assert torch.equal(augment_torch(x, spec, d, MEAN, STD), expected)
