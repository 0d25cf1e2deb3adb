"""`edge_diffusion_sampling.py --convert_from_legacy`: the public EDGE code's output layout -> a distilled set."""
from pathlib import Path

from dataset.distilled import write_distilled_set, write_manifest
from dataset.images import load_image
from utils.common.atomic_io import atomic_save_image, check_output_dir
from utils.common.config import code_version
from utils.common.errors import fail
from utils.stages.sampled_set import clear_output_dir, image_relpath, save_preview


def convert_legacy(legacy_dir, output_dir, overwrite: bool = False, preview_n: int = 16, manifest: dict = None):
    """Convert the public EDGE code's layout (images/{i}.png + prompts/{i}.txt) into a distilled-set folder.

    Images are taken in increasing i and renumbered 0..n-1; the original numbers are kept in the manifest.
    """
    legacy_dir, output_dir = Path(legacy_dir), Path(output_dir)
    check_output_dir(output_dir)
    img_dir, txt_dir = legacy_dir / "images", legacy_dir / "prompts"
    for d in (img_dir, txt_dir):
        if not d.is_dir():
            raise fail(f"{legacy_dir} is not in the legacy layout: {d} is missing (expected images/{{i}}.png and "
                       f"prompts/{{i}}.txt)")
    images = {}
    for p in img_dir.iterdir():
        if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and p.stem.isdigit():
            if int(p.stem) in images:
                raise fail(f"{legacy_dir}: two images numbered {int(p.stem)} ({images[int(p.stem)].name}, {p.name})")
            images[int(p.stem)] = p
    prompts = {int(p.stem): p for p in txt_dir.glob("*.txt") if p.stem.isdigit()}
    if not images:
        raise fail(f"{img_dir} holds no numbered images ({{i}}.png)")
    for i in sorted(images):
        if i not in prompts:
            raise fail(f"{legacy_dir}: image {images[i].name} has no prompt file {txt_dir / f'{i}.txt'}")
    for i in sorted(prompts):
        if i not in images:
            raise fail(f"{legacy_dir}: prompt file {prompts[i].name} has no image {img_dir / f'{i}.png'}")
    order = sorted(images)
    settings = {"converted_from": str(legacy_dir.resolve()), "legacy_indices": order}
    if output_dir.exists() and any((output_dir / n).exists() for n in ("images", "annotations", "manifest.json")):
        if not overwrite:
            raise fail(f"{output_dir} already holds a set; pass --overwrite to replace it or choose another "
                       f"--output_dir")
        clear_output_dir(output_dir)
    records = []
    for new, old in enumerate(order):
        text = prompts[old].read_text(encoding="utf-8").strip()
        if not text:
            raise fail(f"prompt file {prompts[old]} is empty")
        rel = image_relpath(new, "png")
        atomic_save_image(output_dir / rel, load_image(images[old]), format="PNG")
        records.append({"image": rel, "captions": [text]})
    write_manifest(output_dir, {"stage": "sampling", "status": "in_progress", "prompt_source": "legacy layout",
                                **settings, **(manifest or {}), "code_version": code_version()})
    write_distilled_set(output_dir, records, {"status": "complete"})
    if preview_n > 0:
        save_preview(output_dir, records[:preview_n])
    return output_dir
