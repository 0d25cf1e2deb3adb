"""Image loading with one-line errors naming the file."""
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from utils.errors import fail

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_image(path) -> Image.Image:
    """Open `path` fully decoded as an RGB PIL image; missing or corrupt files raise InputError."""
    path = Path(path)
    if not path.is_file():
        raise fail(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()  # decode now so truncated files fail here, not inside a DataLoader worker
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise fail(f"could not read image {path}: {e}")
