"""Distilled-set folders: the output of sampling and captioning and the input of evaluation.

    <folder>/images/000000.png ...
    <folder>/images/metadata.jsonl      Hugging Face `imagefolder` metadata: {"file_name", "text", "captions"}
    <folder>/annotations/train.json     Karpathy train format, one entry per (image, caption)
    <folder>/manifest.json              how the set was made (model, seeds, scheduler, prompts, code version)
"""
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from utils.atomic_io import atomic_write_json, atomic_write_text
from utils.errors import fail

from .karpathy import group_by_image, read_karpathy_train

ANNOTATION_FILE = "annotations/train.json"
METADATA_FILE = "images/metadata.jsonl"
MANIFEST_FILE = "manifest.json"


@dataclass
class DistilledSet:
    """A distilled set read from its folder; `records` are [{"image": rel_path, "captions": [...]}]."""
    folder: Path
    records: list
    manifest: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def groups(self) -> list:
        """Records in the grouped form used by the torch datasets: [{"image", "image_id", "captions"}]."""
        return [{"image": r["image"], "image_id": PurePosixPath(r["image"]).stem, "captions": list(r["captions"])}
                for r in self.records]


def is_distilled_set(folder) -> bool:
    """True when `folder` holds annotations/train.json (the one file every distilled set has)."""
    return (Path(folder) / ANNOTATION_FILE).is_file()


def read_manifest(folder) -> dict:
    """The folder's manifest.json as a dict ({} when the folder has none)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise fail(f"{path} is not valid JSON: {e}")
    if not isinstance(manifest, dict):
        raise fail(f"{path} must hold a JSON object")
    return manifest


def write_manifest(folder, manifest: dict) -> Path:
    """Write `manifest` as the folder's manifest.json (atomically, replacing any previous one)."""
    path = Path(folder) / MANIFEST_FILE
    atomic_write_json(path, manifest)
    return path


def _validate_records(folder: Path, records) -> list:
    if not records:
        raise fail(f"distilled set {folder}: no records to write (zero images)")
    clean, seen = [], set()
    for i, record in enumerate(records):
        image = record.get("image") if isinstance(record, dict) else None
        if not isinstance(image, str) or not image:
            raise fail(f'distilled set {folder}: record {i}: missing "image"')
        rel = PurePosixPath(image)
        if rel.is_absolute() or len(rel.parts) != 2 or rel.parts[0] != "images":
            raise fail(f"distilled set {folder}: record {i}: image path {image!r} must be images/<file name>")
        if image in seen:
            raise fail(f"distilled set {folder}: record {i}: image {image} appears twice")
        seen.add(image)
        if not (folder / image).is_file():
            raise fail(f"distilled set {folder}: record {i}: image file not found: {folder / image}")
        captions = record.get("captions")
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, (list, tuple)) or not captions:
            raise fail(f'distilled set {folder}: record {i} ({image}): "captions" must be a non-empty list')
        for c in captions:
            if not isinstance(c, str) or not c.strip():
                raise fail(f"distilled set {folder}: record {i} ({image}): empty or non-string caption")
        clean.append({"image": image, "captions": [c.strip() for c in captions]})
    return clean


def write_distilled_set(folder, records, manifest: dict = None) -> Path:
    """Write the annotation, imagefolder metadata and manifest files of a distilled set.

    `records`: [{"image": "images/000000.png", "captions": [str, ...]}], images already in place.
    The manifest is merged into any existing manifest.json (new keys win); counts are recorded.
    Each file is written atomically.
    """
    folder = Path(folder)
    records = _validate_records(folder, records)
    train = [{"image": r["image"], "caption": c, "image_id": PurePosixPath(r["image"]).stem}
             for r in records for c in r["captions"]]
    lines = [json.dumps({"file_name": PurePosixPath(r["image"]).name, "text": r["captions"][0],
                         "captions": r["captions"]}, ensure_ascii=False) for r in records]
    merged = {**read_manifest(folder), **(manifest or {})}
    merged["num_images"] = len(records)
    merged["num_captions"] = len(train)
    atomic_write_json(folder / ANNOTATION_FILE, train)
    atomic_write_text(folder / METADATA_FILE, "\n".join(lines) + "\n")
    write_manifest(folder, merged)
    return folder


def read_distilled_set(folder, check_images: bool = True) -> DistilledSet:
    """Read and validate a distilled-set folder (every caption's image must exist when `check_images`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise fail(f"distilled set folder not found: {folder}")
    if not is_distilled_set(folder):
        raise fail(f"{folder} is not a distilled set folder: {folder / ANNOTATION_FILE} is missing")
    entries = read_karpathy_train(folder / ANNOTATION_FILE, image_root=folder, check_images=check_images)
    records = [{"image": g["image"], "captions": g["captions"]} for g in group_by_image(entries)]
    return DistilledSet(folder=folder, records=records, manifest=read_manifest(folder))
