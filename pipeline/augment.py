"""The SSL view augmentations of docs/method.md section 4, batched, with per-sample random parameters.

Every random parameter is drawn per sample (torchvision's transforms on a batched tensor share one
draw, which is wrong here) from a `torch.Generator` seeded from the run's seed and epoch: the same
draws on every run and device. What follows from that (docs/gpu.md): a CPU run of data cropped here
(CIFAR, synthetic) repeats its numbers bit for bit on the same machine and thread count; a GPU run does
not (cuDNN's algorithm choice and atomic additions in some backward kernels vary the rounding), and
neither does any run of data the FFCV decoder crops (ImageNet-100: FFCV draws those crops unseeded).
The ops follow torchvision's functional ops on float images (tests compare them image by image):

  random resized crop (antialiased bicubic or bilinear, as torchvision and PIL) + horizontal flip
  -> colour jitter (brightness, contrast, saturation, hue in a random order per sample) with p
  -> grayscale with p -> Gaussian blur with p -> solarize with p -> normalize.

GPU batches run the torch ops below; CPU batches run the same ops fused in one numba kernel
(`pipeline.augment_cpu`), several times faster on few cores. Both take the same draws.
"""

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.augment_cpu import BICUBIC_A, GRAY, augment_cpu
from pipeline.params import ViewParams


@dataclass(frozen=True)
class ViewSpec:
    """One view's augmentation: probabilities and ranges as in docs/method.md section 4."""

    size: int  # output side, pixels
    crop: bool  # random resized crop here; False when the FFCV decoder already cropped
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    interpolation: str  # "bicubic" or "bilinear"
    flip_p: float
    jitter: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    jitter_p: float
    grayscale_p: float
    blur_p: float
    blur_sigma: tuple[float, float]
    solarize_p: float

    @classmethod
    def from_params(cls, view: ViewParams, size: int, crop: bool) -> "ViewSpec":
        brightness, contrast, saturation, hue = view.jitter
        return cls(
            size,
            crop,
            crop_scale=_pair(view.crop_scale),
            crop_ratio=_pair(view.crop_ratio),
            interpolation=view.interpolation,
            flip_p=view.flip_p,
            jitter=(brightness, contrast, saturation, hue),
            jitter_p=view.jitter_p,
            grayscale_p=view.grayscale_p,
            blur_p=view.blur_p,
            blur_sigma=_pair(view.blur_sigma),
            solarize_p=view.solarize_p,
        )

    @property
    def blur_size(self) -> int:
        return 2 * math.ceil(3 * self.blur_sigma[1]) + 1


def _pair(values: list[float]) -> tuple[float, float]:
    low, high = values
    return low, high


@dataclass(frozen=True)
class Draws:
    """The random parameters of one view for a batch of B images."""

    boxes: Tensor  # (B, 4) int64: top, left, height, width
    flip: Tensor  # (B,) bool
    factors: Tensor  # (B, 4): brightness, contrast, saturation factors, hue shift
    order: Tensor  # (B, 4) int64: the jitter op applied at each of the four steps
    apply: Tensor  # (B, 4) bool: jitter, grayscale, blur, solarize
    sigma: Tensor  # (B,) blur σ


def draw(b: int, hw: tuple[int, int], spec: ViewSpec, generator: torch.Generator) -> Draws:
    device = generator.device

    def uniform(*shape: int) -> Tensor:
        return torch.rand(b, *shape, device=device, generator=generator)

    if spec.crop:
        boxes = torch.stack(crop_boxes(hw, b, spec, generator), 1).long()
    else:
        boxes = _constant((0, 0, *hw), device).expand(b, 4)
    probabilities = _constant((spec.jitter_p, spec.grayscale_p, spec.blur_p, spec.solarize_p), device)
    return Draws(
        boxes=boxes,
        flip=uniform() < spec.flip_p,
        factors=jitter_factors(uniform(4), spec.jitter),
        order=uniform(4).argsort(dim=1),
        apply=uniform(4) < probabilities,
        sigma=spec.blur_sigma[0] + uniform() * (spec.blur_sigma[1] - spec.blur_sigma[0]),
    )


def augment(x: Tensor, spec: ViewSpec, mean: Tensor, std: Tensor, generator: torch.Generator) -> Tensor:
    """uint8 images (B, 3, H, W) -> one augmented, normalized float32 view (B, 3, size, size)."""
    draws = draw(x.shape[0], (x.shape[-2], x.shape[-1]), spec, generator)
    if x.device.type == "cpu":
        return augment_numba(x, spec, draws, mean, std)
    return augment_torch(x, spec, draws, mean, std)


def augment_numba(x: Tensor, spec: ViewSpec, d: Draws, mean: Tensor, std: Tensor) -> Tensor:
    out = torch.empty(x.shape[0], 3, spec.size, spec.size)
    augment_cpu(
        x.permute(0, 2, 3, 1).numpy(),
        out.numpy(),
        d.boxes.numpy(),
        d.flip.numpy(),
        d.factors.float().numpy(),
        d.order.numpy(),
        d.apply.numpy(),
        d.sigma.float().numpy(),
        spec.blur_size,
        spec.interpolation == "bicubic",
        mean.float().numpy(),
        std.float().numpy(),
    )
    return out


def augment_torch(x: Tensor, spec: ViewSpec, d: Draws, mean: Tensor, std: Tensor) -> Tensor:
    """The ops on the whole batch, each sample's own kept (`_where`). Work that cannot change the result is
    skipped: the resize when the decoder already cropped to the output size (its matrices are then exactly
    the identity, or the mirror), and an op whose probability is 0."""
    x = x.float().div_(255)
    if spec.crop or x.shape[-2:] != (spec.size, spec.size):
        top, left, h, w = d.boxes.unbind(1)
        x = resized_crop(x, top, left, h, w, d.flip, spec.size, spec.interpolation).clamp_(0, 1)
    else:
        x = _where(d.flip, x.flip(-1), x)
    if spec.jitter_p:
        x = _where(d.apply[:, 0], color_jitter(x, d.factors, d.order), x)
    if spec.grayscale_p:
        x = _where(d.apply[:, 1], grayscale(x), x)
    if spec.blur_p:
        x = _where(d.apply[:, 2], gaussian_blur(x, d.sigma, spec.blur_size), x)
    if spec.solarize_p:
        x = _where(d.apply[:, 3], solarize(x), x)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def _where(mask: Tensor, done: Tensor, x: Tensor) -> Tensor:
    """Per sample, `done` where `mask` else `x`. Ops run on the whole batch: choosing the samples first
    (nonzero, boolean indexing) would make the host wait for the device at every op."""
    return torch.where(mask.view(-1, 1, 1, 1), done, x)


@functools.lru_cache(maxsize=256)
def _constant(values: tuple[float, ...], device: torch.device) -> Tensor:
    """A small constant tensor, copied to `device` once (a copy each step would make the host wait)."""
    return torch.tensor(values, device=device)


def crop_boxes(hw: tuple[int, int], b: int, spec: ViewSpec, generator: torch.Generator) -> tuple[Tensor, ...]:
    """torchvision's RandomResizedCrop.get_params per sample: (top, left, height, width), each (B,)."""
    height, width = hw
    device = generator.device
    area = (
        height
        * width
        * (
            spec.crop_scale[0]
            + torch.rand(b, 10, device=device, generator=generator) * (spec.crop_scale[1] - spec.crop_scale[0])
        )
    )
    log_ratio = _constant(spec.crop_ratio, device).log()
    ratio = torch.exp(
        log_ratio[0] + torch.rand(b, 10, device=device, generator=generator) * (log_ratio[1] - log_ratio[0])
    )
    w, h = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), 0)  # first acceptable of 10 tries
    h, w = h.gather(1, first[:, None])[:, 0], w.gather(1, first[:, None])[:, 0]
    fallback = ~ok.any(1)  # torchvision's fallback: the whole image, its aspect clamped to the ratio range
    full_h, full_w = height, width
    if width / height < spec.crop_ratio[0]:
        full_h = round(width / spec.crop_ratio[0])
    elif width / height > spec.crop_ratio[1]:
        full_w = round(height * spec.crop_ratio[1])
    h, w = torch.where(fallback, full_h, h), torch.where(fallback, full_w, w)
    u = torch.rand(b, 2, device=device, generator=generator)
    top = torch.where(fallback, (height - h) // 2, (u[:, 0] * (height - h + 1)).floor().clamp(max=height - h))
    left = torch.where(fallback, (width - w) // 2, (u[:, 1] * (width - w + 1)).floor().clamp(max=width - w))
    return top, left, h, w


def resize_matrix(start: Tensor, length: Tensor, in_size: int, out_size: int, interpolation: str) -> Tensor:
    """(B, out_size, in_size) weights resizing x[start:start+length] to out_size, antialiased like
    torchvision/PIL (bicubic a = −0.5, or bilinear), normalized over the taps inside the crop."""
    scale = (length / out_size)[:, None, None]  # (B, 1, 1)
    center = (torch.arange(out_size, device=start.device)[None, :, None] + 0.5) * scale  # (B, S, 1)
    j = torch.arange(in_size, device=start.device)[None, None, :] - start[:, None, None]  # (B, 1, H) crop coords
    t = ((j + 0.5 - center) / scale.clamp(min=1)).abs()
    if interpolation == "bicubic":
        a = BICUBIC_A
        weight = torch.where(
            t < 1,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            torch.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, torch.zeros_like(t)),
        )
    elif interpolation == "bilinear":
        weight = (1 - t).clamp(min=0)
    else:
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
    weight = weight * ((j >= 0) & (j < length[:, None, None]))
    return weight / weight.sum(-1, keepdim=True)


def resized_crop(
    x: Tensor, top: Tensor, left: Tensor, h: Tensor, w: Tensor, flip: Tensor, size: int, interpolation: str
) -> Tensor:
    """Per-sample crop (top, left, h, w) resized to size × size, mirrored where `flip`: (B, 3, size, size)."""
    b, c, height, width = x.shape
    m_y = resize_matrix(top, h, height, size, interpolation)  # (B, S, H)
    m_x = resize_matrix(left, w, width, size, interpolation)  # (B, S, W)
    m_x = torch.where(flip[:, None, None], m_x.flip(1), m_x)
    rows = torch.bmm(m_y, x.permute(0, 2, 1, 3).reshape(b, height, c * width))  # (B, S, C·W)
    out = torch.bmm(rows.view(b, size * c, width), m_x.transpose(1, 2))  # (B, S·C, S)
    return out.view(b, size, c, size).permute(0, 2, 1, 3)


def jitter_factors(u: Tensor, strength: tuple[float, float, float, float]) -> Tensor:
    """(B, 4) uniform draws -> brightness, contrast, saturation in [max(0, 1 − s), 1 + s], hue in [−s, s]."""
    low = _constant(tuple(max(0.0, 1 - s) for s in strength[:3]) + (-strength[3],), u.device)
    high = _constant(tuple(1 + s for s in strength[:3]) + (strength[3],), u.device)
    return low + u * (high - low)


def grayscale(x: Tensor) -> Tensor:
    gray = GRAY[0] * x[:, 0] + GRAY[1] * x[:, 1] + GRAY[2] * x[:, 2]
    return gray[:, None].expand_as(x).contiguous()


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # the jitter ops, as indexed in Draws.factors and Draws.order


def color_jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """torchvision's ColorJitter with per-sample factors (B, 4) applied in per-sample order (B, 4).

    Brightness, contrast and saturation are one blend with a per-sample target, so each step computes one blend
    for the whole batch; each sample shifts its hue once, so the hue (an HSV round trip, the costly op) is
    computed once: the blends before each sample's hue step, the hue, the blends after it."""
    hue_step = (order == HUE).int().argmax(1)  # (B,)
    for step in range(3):
        x = _where(step < hue_step, _blend_step(x, factors, order[:, step]), x)
    x = adjust_hue(x, factors[:, HUE])
    for step in range(1, 4):
        x = _where(step > hue_step, _blend_step(x, factors, order[:, step]), x)
    return x


def _blend_step(x: Tensor, factors: Tensor, op: Tensor) -> Tensor:
    """Each sample's brightness, contrast or saturation blend (`op`, (B,)); samples whose op is the hue get
    an unused value."""
    gray = grayscale(x)
    op = op.view(-1, 1, 1, 1)
    target = torch.where(op == CONTRAST, gray.mean((1, 2, 3), keepdim=True), 0.0)  # brightness: black
    target = torch.where(op == SATURATION, gray, target)
    return _blend(x, target, factors.gather(1, op.view(-1, 1)).view(-1))


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """torchvision's adjust_hue: to HSV, rotate hue by `shift` (B,) turns, back to RGB."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    chroma = maxc - minc
    safe = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(chroma == 0, torch.zeros_like(hue), hue)
    hue = (hue / 6.0 + 1.0) % 1.0
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    saturation = chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    return _hsv_to_rgb(hue, saturation, maxc)


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    table = torch.stack([torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return table.gather(0, i[None, :, None].expand(1, -1, 3, -1, -1))[0]


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """torchvision's gaussian_blur (reflect padding) with a per-sample σ (B,)."""
    b, c, height, width = x.shape
    half = (kernel_size - 1) * 0.5
    grid = torch.linspace(-half, half, kernel_size, device=x.device)
    kernel = torch.exp(-0.5 * (grid[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B·C, k)
    pad = kernel_size // 2
    y = torch.nn.functional.pad(x.reshape(1, b * c, height, width), (pad, pad, pad, pad), mode="reflect")
    y = torch.nn.functional.conv2d(y, kernel[:, None, :, None], groups=b * c)
    y = torch.nn.functional.conv2d(y, kernel[:, None, None, :], groups=b * c)
    return y.view(b, c, height, width)


def solarize(x: Tensor, threshold: float = 0.5) -> Tensor:
    return torch.where(x >= threshold, 1 - x, x)
