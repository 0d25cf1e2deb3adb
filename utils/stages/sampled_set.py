"""Stage 2's output folder: image paths, which process renders which block, resume checks, the final set and its
labelled preview grid. The set's format itself is `dataset.distilled`."""
import shutil
import textwrap
from pathlib import Path

from utils.common.atomic_io import atomic_save_image
from utils.common.errors import fail

# Manifest keys that must match for a rerun to resume into an existing folder (code_version may differ).
SETTINGS_KEYS = ("model", "lora_weights", "scheduler", "num_inference_steps", "guidance_scale", "negative_prompt",
                 "seed", "height", "width", "dtype", "image_format", "num_images", "prompt_source",
                 "prompts_sha256", "batch_size")
PREVIEW_FILE = "preview.png"


def image_relpath(index: int, image_format: str = "png") -> str:
    """The distilled-set path of image `index`: images/000123.png."""
    return f"images/{index:06d}.{image_format}"


def blocks_for_process(num_images: int, batch_size: int, process_index: int, num_processes: int) -> list:
    """Index blocks [c*B, (c+1)*B) with c % num_processes == process_index (see the module docstring)."""
    if batch_size <= 0:
        raise fail(f"--batch_size must be positive, got {batch_size}")
    blocks = [list(range(s, min(s + batch_size, num_images))) for s in range(0, num_images, batch_size)]
    return [b for c, b in enumerate(blocks) if c % num_processes == process_index]


def settings_differences(existing: dict, settings: dict) -> list:
    """Names of the SETTINGS_KEYS whose values differ between an existing manifest and `settings`."""
    return [k for k in SETTINGS_KEYS if existing.get(k) != settings.get(k)]


def check_existing_set(output_dir, settings: dict, overwrite: bool) -> bool:
    """Decide whether `output_dir` can receive this set; True when it must be cleared first (--overwrite).

    Refuses (InputError) a folder holding a set made with other settings, or images/annotations without
    a manifest, unless `overwrite`. Read-only: every process may call it.
    """
    from dataset.distilled import MANIFEST_FILE, read_manifest

    output_dir = Path(output_dir)
    if not output_dir.exists():
        return False
    if output_dir.is_file():
        raise fail(f"--output_dir {output_dir} is a file")
    has_content = any((output_dir / n).exists() for n in ("images", "annotations", MANIFEST_FILE))
    if not has_content:
        return False
    manifest = read_manifest(output_dir)
    if not manifest:
        if overwrite:
            return True
        raise fail(f"{output_dir} holds images/ or annotations/ without a {MANIFEST_FILE} (a foreign or damaged "
                   f"set); pass --overwrite to replace it or choose another --output_dir")
    diffs = settings_differences(manifest, settings)
    if not diffs:
        return False
    if overwrite:
        return True
    shown = ", ".join(f"{k}: {manifest.get(k)!r} -> {settings.get(k)!r}" for k in diffs[:3])
    more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise fail(f"{output_dir} holds a set made with other settings ({shown}{more}); pass --overwrite to replace "
               f"it or choose another --output_dir")


def clear_output_dir(output_dir) -> None:
    """Remove the files of a previous set (images/, annotations/, manifest.json, preview) from `output_dir`."""
    from dataset.distilled import MANIFEST_FILE

    output_dir = Path(output_dir)
    for name in ("images", "annotations"):
        if (output_dir / name).exists():
            shutil.rmtree(output_dir / name)
    for name in (MANIFEST_FILE, PREVIEW_FILE):
        (output_dir / name).unlink(missing_ok=True)


def image_is_complete(path) -> bool:
    """True when `path` is a whole, decodable image (a 0-byte or truncated file from a killed run is not)."""
    from PIL import Image

    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
        with Image.open(path) as image:
            image.load()  # full decode: verify() alone misses a file cut after its last complete chunk
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means "render it again"
        return False


def missing_indices(output_dir, num_images: int, image_format: str = "png") -> list:
    """Indices whose image file does not exist yet or is broken (empty or truncated)."""
    output_dir = Path(output_dir)
    return [i for i in range(num_images) if not image_is_complete(output_dir / image_relpath(i, image_format))]


def finalize_set(output_dir, prompts, image_format="png", preview_n: int = 16) -> Path:
    """Write annotations, metadata and the completed manifest (all images must exist), and the preview grid."""
    from dataset.distilled import write_distilled_set

    output_dir = Path(output_dir)
    missing = missing_indices(output_dir, len(prompts), image_format)
    if missing:
        raise RuntimeError(f"{len(missing)} images still missing in {output_dir} (first: {missing[0]})")
    records = [{"image": image_relpath(i, image_format), "captions": [p]} for i, p in enumerate(prompts)]
    write_distilled_set(output_dir, records, {"status": "complete"})
    if preview_n > 0:
        save_preview(output_dir, records[:preview_n])
    return output_dir


def labelled_grid(images, labels, cell: int = 192, cols: int = None):
    """A grid of images (resized to `cell` px) with each label wrapped below its image."""
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    chars = max(8, cell // 7)
    line_h = 12
    n_lines = 4
    cols = cols or min(4, len(images))
    rows = -(-len(images) // cols)
    cells = []
    for image, label in zip(images, labels):
        canvas = Image.new("RGB", (cell + 6, cell + n_lines * line_h + 8), "white")  # margin between cells
        canvas.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST if image.width < cell else
                                                 Image.BICUBIC), (0, 0))
        draw = ImageDraw.Draw(canvas)
        lines = textwrap.wrap(label, chars)[:n_lines]
        for k, line in enumerate(lines):
            draw.text((2, cell + 2 + k * line_h), line, fill="black", font=font)
        cells.append(canvas)
    while len(cells) < rows * cols:
        cells.append(Image.new("RGB", cells[0].size, "white"))
    return make_image_grid(cells, rows=rows, cols=cols)


def save_preview(output_dir, records, cell: int = 192) -> Path:
    """Write preview.png: the first images of the set labelled with their first caption."""
    from dataset.images import load_image

    output_dir = Path(output_dir)
    images = [load_image(output_dir / r["image"]) for r in records]
    grid = labelled_grid(images, [r["captions"][0] for r in records], cell=cell)
    path = output_dir / PREVIEW_FILE
    atomic_save_image(path, grid, format="PNG")
    return path
