"""Karpathy-split JSON annotations (the files BLIP and LoRS read for Flickr30K and COCO).

train: a list of {"image": rel_path, "caption": str, "image_id": str}, one entry per pair.
val/test: a list of {"image": rel_path, "caption": [str, ...]}, one entry per image.
Image paths are relative to an image root.
"""
import os
from pathlib import Path

from utils.common.atomic_io import read_json
from utils.common.errors import fail


def _read_entry_list(ann_file) -> list:
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise fail(f"annotation file not found: {ann_file}")
    data = read_json(ann_file)
    if not isinstance(data, list):
        raise fail(f"{ann_file} must hold a JSON list of entries, found {type(data).__name__}")
    if not data:
        raise fail(f"{ann_file} holds an empty split (no entries)")
    return data


def _image_field(ann_file, i, entry) -> str:
    if not isinstance(entry, dict):
        raise fail(f"{ann_file} entry {i}: expected an object, found {type(entry).__name__}")
    if "image" not in entry:
        raise fail(f'{ann_file} entry {i}: missing "image"')
    image = entry["image"]
    if not isinstance(image, str) or not image.strip():
        raise fail(f'{ann_file} entry {i}: "image" must be a non-empty string')
    if "caption" not in entry:
        raise fail(f'{ann_file} entry {i}: missing "caption"')
    return image


def _check_caption(ann_file, i, caption) -> str:
    if not isinstance(caption, str):
        raise fail(f'{ann_file} entry {i}: "caption" must be a string, found {type(caption).__name__}')
    if not caption.strip():
        raise fail(f'{ann_file} entry {i}: "caption" is empty')
    return caption


def _check_images(ann_file, entries, image_root) -> None:
    """Existence check only (fast); each distinct image is checked once."""
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise fail(f"image root not found: {image_root} (needed by {ann_file})")
    seen = set()
    for i, entry in enumerate(entries):
        rel = entry["image"]
        if rel in seen:
            continue
        seen.add(rel)
        if not os.path.isfile(image_root / rel):
            raise fail(f"{ann_file} entry {i}: image file not found: {image_root / rel}")


def read_karpathy_train(ann_file, image_root=None, check_images=True) -> list:
    """Read a Karpathy train file into [{"image", "caption", "image_id"}] (image_id defaults to the image path).

    With `check_images` and an `image_root`, every referenced image must exist under the root.
    """
    data = _read_entry_list(ann_file)
    entries = []
    for i, entry in enumerate(data):
        image = _image_field(ann_file, i, entry)
        caption = _check_caption(ann_file, i, entry["caption"])
        image_id = entry.get("image_id", image)
        entries.append({"image": image, "caption": caption.strip(), "image_id": str(image_id)})
    if check_images and image_root is not None:
        _check_images(ann_file, entries, image_root)
    return entries


def read_karpathy_eval(ann_file, image_root=None, check_images=True) -> list:
    """Read a Karpathy val/test file into [{"image", "caption": [str, ...]}]; a lone string caption is wrapped.

    Each image must appear once (a repeated image means a train-format file, whose recalls would be wrong).
    """
    data = _read_entry_list(ann_file)
    entries, first_entry = [], {}
    for i, entry in enumerate(data):
        image = _image_field(ann_file, i, entry)
        captions = entry["caption"]
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list):
            raise fail(f'{ann_file} entry {i}: "caption" must be a string or a list of strings')
        if not captions:
            raise fail(f'{ann_file} entry {i}: "caption" is an empty list')
        captions = [_check_caption(ann_file, i, c).strip() for c in captions]
        if image in first_entry:
            raise fail(f"{ann_file} entry {i}: image {image} repeats entry {first_entry[image]}; an evaluation "
                       f"split lists each image once with all its captions (is this a train file?)")
        first_entry[image] = i
        entries.append({"image": image, "caption": captions})
    if check_images and image_root is not None:
        _check_images(ann_file, entries, image_root)
    return entries


def group_by_image(train_entries) -> list:
    """Group train entries by image: [{"image", "image_id", "captions": [...]}] in first-occurrence order."""
    groups = {}
    for entry in train_entries:
        group = groups.get(entry["image"])
        if group is None:
            group = groups[entry["image"]] = {"image": entry["image"],
                                              "image_id": str(entry.get("image_id", entry["image"])),
                                              "captions": []}
        group["captions"].append(entry["caption"])
    return list(groups.values())


def eval_from_groups(groups) -> list:
    """Turn grouped train entries into eval entries [{"image", "caption": [...]}]."""
    return [{"image": g["image"], "caption": list(g["captions"])} for g in groups]
