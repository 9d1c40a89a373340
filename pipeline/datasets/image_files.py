"""Reading one image file of a user's tree as (H, W, 3) uint8 RGB, with errors that name the file.

16-bit images (PNG, TIFF) are stored with 8 bits per channel, as FFCV stores every image: each value
keeps its high byte (value >> 8). Pillow does this itself for 16-bit colour; for 16-bit grayscale its
`convert("RGB")` would clip every value above 255 to white, so that mode is reduced here. 32-bit
integer and float images are refused. `convert` logs which files were 16-bit (see `survey_tree`).
"""

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import UserError

UNSUPPORTED_MODES = {"I": "32-bit integer", "F": "32-bit float"}


def open_image(path: Path) -> Image.Image:
    """The image at `path`, header read, pixels not yet decoded; a UserError naming it if unreadable.
    Pillow's warning about images over 89 megapixels is not shown (a Python warning line, naming Pillow's
    source): images over twice that are refused as unreadable, and `convert` names odd sizes itself."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None
    if image.mode in UNSUPPORTED_MODES:
        image.close()
        raise UserError(f"{path}: {UNSUPPORTED_MODES[image.mode]} pixels are not supported; save it as 8-bit RGB")
    return image


def is_16_bit(image: Image.Image) -> bool:
    """Whether the file stores 16 bits per channel (the raw mode of its pixel data says so)."""
    return image.mode.startswith("I;16") or any(";16" in str(tile[3]) for tile in image.tile)  # type: ignore[attr-defined]


def to_rgb8(image: Image.Image, path: Path) -> np.ndarray:
    """Decode `image` (opened from `path`) as (H, W, 3) uint8 RGB."""
    try:
        if image.mode.startswith("I;16"):  # 16-bit grayscale: keep the high byte, as Pillow does for colour
            gray = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=2)
        return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt pixel data
        raise UserError(f"{path}: not a readable image ({e})") from None


def read_rgb(path: Path) -> np.ndarray:
    """The image at `path` as (H, W, 3) uint8 RGB."""
    with open_image(path) as image:
        return to_rgb8(image, path)
