"""Pixel statistics of a dataset's train split (`ChannelMoments`), against a float64 reference."""

import tracemalloc

import numpy as np
import pytest

from pipeline.datasets.splits import ChannelMoments


@pytest.mark.parametrize(
    "low, high, shape",
    [(0, 256, (50, 32, 32, 3)), (250, 256, (7, 33, 17, 3)), (0, 2, (3, 5, 5, 3)), (128, 129, (1, 4, 4, 3))],
)
def test_moments_match_float64_numpy(low, high, shape):
    """Mean and std equal numpy's float64 ones, added image by image or all at once. Bound: the result is
    rounded to 4 decimals (error <= 5e-5); the float64 arithmetic on exact counts adds ~1e-15, so 5e-5 + 1e-12
    holds. The near-constant images (values 250-255, std ~1e-2 against a mean of ~1) are where the one-pass
    E[x^2] - E[x]^2 loses digits; the constant ones (std 0) where it can go negative."""
    images = np.random.default_rng(0).integers(low, high, shape, dtype=np.uint8)
    reference = images.astype(np.float64) / 255
    whole, one_by_one = ChannelMoments(), ChannelMoments()
    whole.add(images)
    for image in images:
        one_by_one.add(image)
    assert whole.result() == one_by_one.result()
    mean, std = whole.result()
    np.testing.assert_allclose(mean, reference.mean((0, 1, 2)), rtol=0, atol=5e-5 + 1e-12)
    np.testing.assert_allclose(std, reference.std((0, 1, 2)), rtol=0, atol=5e-5 + 1e-12)


def test_moments_of_a_huge_image_take_bounded_memory():
    """Issue 20: one 10000x10000 image was scaled to float64 whole (2.24 GiB, twice). Now the temporaries are
    one chunk of int64 bin indices (CHUNK x 3 x 8 bytes), whatever the image's size: here an image 8 times
    that chunk in uint8, 64 times it as float64."""
    side = int(np.sqrt(8 * ChannelMoments.CHUNK * 8))  # 8 x CHUNK x 3 x 8 bytes of uint8 pixels
    image = np.full((side, side, 3), 7, np.uint8)
    chunk_bytes = ChannelMoments.CHUNK * 3 * 8
    moments = ChannelMoments()
    tracemalloc.start()
    try:
        moments.add(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * chunk_bytes, f"{peak / 2**20:.0f} MiB for an image of {image.nbytes / 2**20:.0f} MiB"
    assert moments.result() == ([round(7 / 255, 4)] * 3, [0.0] * 3)
