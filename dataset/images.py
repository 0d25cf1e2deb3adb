"""Image loading with one-line errors naming the file.

Every image becomes 8-bit RGB. High-bit-depth and float images are scaled to 0..255 rather than
clipped (PIL's own `convert("RGB")` clips a 16-bit PNG to a handful of grey levels):
  * I;16 / I;16L / I;16B (16-bit PNG, TIFF): value / 257, so 65535 -> 255;
  * I (32-bit int): the same 16-bit scaling when the values lie in 0..65535 (what 16-bit files decode
    to), else the image's own min..max range;
  * F (float): 0..1 data x 255, 0..255 data as it is, any other range min..max; NaN/inf -> 0.
`check_image_size` warns (once per process) when an image is far smaller than the resolution it is
about to be resized to, e.g. a 1x1 image upscaled to 512 px.
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.common.errors import fail

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SMALL_FACTOR = 4  # warn when the shorter side is below resolution / SMALL_FACTOR
_warned_small = False


def load_image(path, resolution: int = None) -> Image.Image:
    """Open `path` fully decoded as an 8-bit RGB PIL image; missing or corrupt files raise InputError.

    With `resolution` (the size the caller will resize to), a far smaller image gets a one-time warning.
    """
    path = Path(path)
    if not path.is_file():
        raise fail(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()  # decode now so truncated files fail here, not inside a DataLoader worker
            rgb = to_rgb8(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise fail(f"could not read image {path}: {e}")
    if resolution:
        check_image_size(rgb, resolution, path)
    return rgb


def to_rgb8(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, scaling 16-bit, 32-bit int and float modes to 0..255 (see the module doc)."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _scale_to_uint8(np.asarray(image), mode)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    a = a.astype(np.float64)
    a[~np.isfinite(a)] = 0.0
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        out = a / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1.0:
        out = a * 255.0
    elif mode == "F" and lo >= 0 and hi <= 255.0:
        out = a
    else:  # an unusual range: stretch the image's own range
        out = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def check_image_size(image: Image.Image, resolution: int, path=None) -> bool:
    """Warn once per process when `image`'s shorter side is below resolution / SMALL_FACTOR.

    Loaders call it with the resolution they resize to (training --resolution, the evaluator's input
    size); returns True when the image is that small (whether or not the warning was printed now).
    """
    global _warned_small
    w, h = image.size
    if min(w, h) * SMALL_FACTOR >= int(resolution):
        return False
    if not _warned_small:
        _warned_small = True
        name = f"image {path}" if path is not None else "an image"
        print(f"warning: {name} is {w}x{h}, far smaller than the resolution {resolution}; it is upscaled "
              f"{int(resolution) / max(1, min(w, h)):.0f}x (further small images are not reported)",
              file=sys.stderr)
    return True
