"""CC3M as downloaded by img2dataset: image folders or webdataset tar shards, one caption per image.

Folder layout: <folder>/00000/000000000.jpg with 000000000.txt holding its caption (or a
000000000.json with a "caption" field); a flat folder of image + .txt pairs works too.
"""
import json
import tarfile
from pathlib import Path

from utils.common.errors import InputError, fail

from .images import IMAGE_SUFFIXES


def _caption_for(image_path: Path) -> str:
    txt = image_path.with_suffix(".txt")
    if txt.is_file():
        caption = txt.read_text(encoding="utf-8", errors="replace").strip()
    else:
        meta = image_path.with_suffix(".json")
        if not meta.is_file():
            raise fail(f"no caption for {image_path}: expected {txt.name} beside it")
        try:
            caption = str(json.loads(meta.read_text(encoding="utf-8")).get("caption") or "").strip()
        except (json.JSONDecodeError, AttributeError) as e:
            raise fail(f"{meta} is not a valid img2dataset metadata file: {e}")
    if not caption:
        raise fail(f"empty caption for {image_path}")
    return caption


def read_cc3m_folder(folder) -> list:
    """Train entries [{"image": rel_path, "caption", "image_id"}] of an img2dataset folder, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise fail(f"CC3M folder not found: {folder}")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise fail(f"CC3M folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [{"image": p.relative_to(folder).as_posix(), "caption": _caption_for(p), "image_id": p.stem}
            for p in images]


def cc3m_eval_entries(folder) -> list:
    """Eval entries [{"image", "caption": [caption]}] of a CC3M validation folder (one caption per image)."""
    return [{"image": e["image"], "caption": [e["caption"]]} for e in read_cc3m_folder(folder)]


def iter_cc3m_shards(urls_or_pattern):
    """Yield (PIL RGB image, caption, key) from webdataset tar shards (a list, a path, or a brace pattern)."""
    import webdataset as wds
    from webdataset.autodecode import DecodingError

    urls = [str(u) for u in urls_or_pattern] if isinstance(urls_or_pattern, (list, tuple)) else str(urls_or_pattern)
    for path in ([urls] if isinstance(urls, str) else urls):
        if "{" not in path and "://" not in path and not Path(path).is_file():
            raise fail(f"webdataset shard not found: {path}")
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pilrgb")
    try:
        for sample in dataset:
            key = sample.get("__key__")
            image = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            caption = sample.get("txt")
            if caption is None and isinstance(sample.get("json"), dict):
                caption = sample["json"].get("caption")
            if image is None:
                raise fail(f"{sample.get('__url__', urls)}: sample {key} has no image (jpg/png/webp)")
            if not caption or not str(caption).strip():
                raise fail(f"{sample.get('__url__', urls)}: sample {key} has no caption (txt)")
            yield image, str(caption).strip(), key
    except InputError:
        raise
    except DecodingError as e:
        raise fail(f"{e.url}: sample {e.key}: could not decode {e.k}: {e.__cause__ or e.__context__}")
    except (OSError, ValueError, tarfile.TarError) as e:
        raise fail(f"could not read webdataset shards {urls}: {e}")
