"""The view augmentation of `pipeline.augment` as one fused numba kernel, for CPU batches.

The same ops as the torch path (which serves GPUs), pixel loop by pixel loop: on 2 CPU cores the
torch ops spend their time dispatching small kernels (measured: ~2.5k two-view CIFAR images/s),
this kernel runs one parallel pass per image (`python -m stages bench` measures it). Tests check it
against the torch path and torchvision's functional ops.
"""

import math

import numpy as np
from numba import njit, prange

F32 = np.float32
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
BICUBIC_A = -0.5  # the cubic convolution coefficient of torchvision's antialiased resize and PIL
GR, GG, GB = F32(GRAY[0]), F32(GRAY[1]), F32(GRAY[2])


@njit(cache=True, fastmath=True)
def _resize_weights(start, length, in_size, out_size, bicubic, flip):
    """(in_size, out_size) antialiased resize weights (torchvision/PIL) of x[start:start+length]."""
    m = np.zeros((in_size, out_size), np.float32)
    scale = length / out_size
    stretch = max(scale, 1.0)
    support = (2.0 if bicubic else 1.0) * stretch
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), length)
        total = 0.0
        col = out_size - 1 - i if flip else i
        for j in range(lo, hi):
            t = abs((j - center + 0.5) / stretch)
            if bicubic:
                w = (
                    (((BICUBIC_A + 2) * t - (BICUBIC_A + 3)) * t * t + 1.0)
                    if t < 1.0
                    else ((((t - 5.0) * t + 8.0) * t - 4.0) * BICUBIC_A if t < 2.0 else 0.0)
                )
            else:
                w = max(0.0, 1.0 - t)
            m[start + j, col] = w
            total += w
        for j in range(lo, hi):
            m[start + j, col] /= total
    return m


@njit(cache=True, fastmath=True)
def _crop(image, top, left, h, w, size, bicubic, flip, buf):
    """image (H, W, 3) uint8 -> buf (3, size, size) float32 in [0, 1]."""
    height, width, _ = image.shape
    mx = _resize_weights(left, w, width, size, bicubic, flip)  # (W, S)
    my = _resize_weights(top, h, height, size, bicubic, False)  # (H, S)
    rows = np.zeros((3, h, size), np.float32)
    for y in range(h):
        for x in range(left, left + w):
            for c in range(3):
                v = F32(image[top + y, x, c]) * F32(1 / 255)
                for j in range(size):
                    rows[c, y, j] += v * mx[x, j]
    buf[:] = 0
    for i in range(size):
        for y in range(h):
            wgt = my[top + y, i]
            if wgt != 0:
                for c in range(3):
                    for j in range(size):
                        buf[c, i, j] += wgt * rows[c, y, j]
    for c in range(3):
        for i in range(size):
            for j in range(size):
                buf[c, i, j] = min(max(buf[c, i, j], F32(0)), F32(1))


@njit(cache=True, fastmath=True)
def _hue(buf, shift):
    size = buf.shape[1]
    for i in range(size):
        for j in range(size):
            r, g, b = buf[0, i, j], buf[1, i, j], buf[2, i, j]
            maxc = max(r, g, b)
            minc = min(r, g, b)
            chroma = maxc - minc
            h = F32(0)
            if chroma != 0:
                rc, gc, bc = (maxc - r) / chroma, (maxc - g) / chroma, (maxc - b) / chroma
                if maxc == r:
                    h = bc - gc
                elif maxc == g:
                    h = F32(2) + rc - bc
                else:
                    h = F32(4) + gc - rc
            h = (h / F32(6) + F32(1)) % F32(1)
            h = (h + shift) % F32(1)
            s = chroma / maxc if maxc != 0 else F32(0)
            v = maxc
            sector = math.floor(h * F32(6))
            f = h * F32(6) - sector
            p = min(max(v * (F32(1) - s), F32(0)), F32(1))
            q = min(max(v * (F32(1) - s * f), F32(0)), F32(1))
            t = min(max(v * (F32(1) - s * (F32(1) - f)), F32(0)), F32(1))
            k = int(sector) % 6
            if k == 0:
                r, g, b = v, t, p
            elif k == 1:
                r, g, b = q, v, p
            elif k == 2:
                r, g, b = p, v, t
            elif k == 3:
                r, g, b = p, q, v
            elif k == 4:
                r, g, b = t, p, v
            else:
                r, g, b = v, p, q
            buf[0, i, j], buf[1, i, j], buf[2, i, j] = r, g, b


@njit(cache=True, fastmath=True)
def _jitter(buf, factors, order):
    size = buf.shape[1]
    for step in range(4):
        op = order[step]
        f = factors[op]
        if op == 0:
            for c in range(3):
                for i in range(size):
                    for j in range(size):
                        buf[c, i, j] = min(max(f * buf[c, i, j], F32(0)), F32(1))
        elif op == 1:
            m = F32(0)
            for i in range(size):
                for j in range(size):
                    m += GR * buf[0, i, j] + GG * buf[1, i, j] + GB * buf[2, i, j]
            m = (F32(1) - f) * m / F32(size * size)
            for c in range(3):
                for i in range(size):
                    for j in range(size):
                        buf[c, i, j] = min(max(f * buf[c, i, j] + m, F32(0)), F32(1))
        elif op == 2:
            for i in range(size):
                for j in range(size):
                    gray = (F32(1) - f) * (GR * buf[0, i, j] + GG * buf[1, i, j] + GB * buf[2, i, j])
                    for c in range(3):
                        buf[c, i, j] = min(max(f * buf[c, i, j] + gray, F32(0)), F32(1))
        else:
            _hue(buf, f)


@njit(cache=True, fastmath=True)
def _blur(buf, sigma, ksize):
    _, size, _ = buf.shape
    half = ksize // 2
    kern = np.empty(ksize, np.float32)
    for t in range(ksize):
        x = (t - half) / sigma
        kern[t] = math.exp(-0.5 * x * x)
    kern /= kern.sum()
    pad = np.empty((3, size + 2 * half, size + 2 * half), np.float32)
    for c in range(3):  # reflect padding
        for i in range(-half, size + half):
            ii = -i if i < 0 else (2 * size - 2 - i if i >= size else i)
            for j in range(-half, size + half):
                jj = -j if j < 0 else (2 * size - 2 - j if j >= size else j)
                pad[c, i + half, j + half] = buf[c, ii, jj]
    rows = np.zeros((3, size + 2 * half, size), np.float32)
    for c in range(3):
        for i in range(size + 2 * half):
            for t in range(ksize):
                for j in range(size):
                    rows[c, i, j] += kern[t] * pad[c, i, j + t]
    buf[:] = 0
    for c in range(3):
        for i in range(size):
            for t in range(ksize):
                for j in range(size):
                    buf[c, i, j] += kern[t] * rows[c, i + t, j]


@njit(parallel=True, cache=True, fastmath=True)
def augment_cpu(images, out, boxes, flip, factors, order, apply, sigma, ksize, bicubic, mean, std):
    """images (B, H, W, 3) uint8 -> out (B, 3, S, S) float32, normalized."""
    size = out.shape[2]
    for k in prange(images.shape[0]):
        buf = np.empty((3, size, size), np.float32)
        _crop(images[k], boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3], size, bicubic, flip[k], buf)
        if apply[k, 0]:
            _jitter(buf, factors[k], order[k])
        if apply[k, 1]:
            for i in range(size):
                for j in range(size):
                    gray = GR * buf[0, i, j] + GG * buf[1, i, j] + GB * buf[2, i, j]
                    buf[0, i, j] = gray
                    buf[1, i, j] = gray
                    buf[2, i, j] = gray
        if apply[k, 2]:
            _blur(buf, sigma[k], ksize)
        for c in range(3):
            for i in range(size):
                for j in range(size):
                    v = buf[c, i, j]
                    if apply[k, 3] and v >= F32(0.5):
                        v = F32(1) - v
                    out[k, c, i, j] = (v - mean[c]) / std[c]
