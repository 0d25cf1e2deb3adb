"""Distilled-set folders: the output of sampling and captioning and the input of evaluation.

    <folder>/images/000000.png ...
    <folder>/images/metadata.jsonl      Hugging Face `imagefolder` metadata: {"file_name", "text", "captions"}
    <folder>/annotations/train.json     Karpathy train format, one entry per (image, caption)
    <folder>/manifest.json              how the set was made (model, seeds, scheduler, prompts, code version)
"""
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from utils.common.atomic_io import atomic_write_json, atomic_write_text, read_json
from utils.common.errors import fail

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
    manifest = read_json(path)
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
    manifest = read_manifest(folder)
    _check_complete(folder, records, manifest)
    return DistilledSet(folder=folder, records=records, manifest=manifest)


def real_twin_groups(dset: DistilledSet, train_groups: list) -> list:
    """The set's real twin: each record's image replaced by the real train image its prompt was drawn from
    (manifest prompt_source.source_images, by the record's index), its captions kept. Training on it is the
    control that swaps only the generated images for real ones. `train_groups`: group_by_image of the
    real train split the prompts came from (one-line error when the manifest or an image does not match)."""
    manifest_file = dset.folder / MANIFEST_FILE
    source = dset.manifest.get("prompt_source")
    sources = source.get("source_images") if isinstance(source, dict) else None
    if not isinstance(sources, list) or not sources:
        raise fail(f"{manifest_file}: no prompt_source.source_images (the set's prompts were not drawn from a "
                   f"data set's train captions), so it has no real twin")
    by_image = {g["image"]: g for g in train_groups}
    twin = []
    for record in dset.records:
        stem = PurePosixPath(record["image"]).stem
        if not stem.isdigit() or int(stem) >= len(sources):
            raise fail(f"{manifest_file}: image {record['image']} has no entry in prompt_source.source_images "
                       f"({len(sources)} entries)")
        real = by_image.get(sources[int(stem)])
        if real is None:
            raise fail(f"{manifest_file}: source image {sources[int(stem)]} of {record['image']} is not in the "
                       f"train split given (--dataset/--ann_root must be the data the set was sampled from)")
        twin.append({"image": real["image"], "image_id": real["image_id"], "captions": list(record["captions"])})
    return twin


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _check_complete(folder: Path, records: list, manifest: dict) -> None:
    """Every image of the set is in the annotation file: the files in images/, the imagefolder metadata and
    the manifest's count agree with it (an omitted image would otherwise be skipped by every later stage)."""
    ann_file = folder / ANNOTATION_FILE
    annotated = {r["image"] for r in records}
    image_dir = folder / "images"
    if image_dir.is_dir():
        on_disk = sorted(f"images/{p.name}" for p in image_dir.iterdir()
                         if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for rel in on_disk:
            if rel not in annotated:
                raise fail(f"{ann_file} omits image {rel} (a file in {image_dir}); every image of a distilled "
                           f"set needs its captions there: rerun the stage that wrote the set, or remove the file")
    count = manifest.get("num_images")
    if isinstance(count, int) and not isinstance(count, bool) and count != len(records):
        raise fail(f"{folder / MANIFEST_FILE} records {count} images but {ann_file} captions {len(records)}; "
                   f"the set is incomplete: rerun the stage that wrote it")
    meta = folder / METADATA_FILE
    if meta.is_file():
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            try:
                name = json.loads(line).get("file_name") if line.strip() else None
            except (json.JSONDecodeError, AttributeError):
                raise fail(f"{meta} line {n} is not a JSON object")
            if isinstance(name, str) and f"images/{name}" not in annotated:
                raise fail(f"{ann_file} omits image images/{name} (listed in {meta}); every image of a distilled "
                           f"set needs its captions there: rerun the stage that wrote the set")


def caption_warnings(dset: DistilledSet) -> list:
    """One-line warnings about captioning that fell short of what the manifest asked for (empty when none).

    The caption scripts record {"cpi", "failed", "short", "unreadable"} under the manifest's "captions";
    images with fewer than `cpi` captions, or any failed/short/unreadable count, give one line naming
    manifest.json.
    """
    info = dset.manifest.get("captions")
    if not isinstance(info, dict):
        return []
    cpi = info.get("cpi")
    cpi = cpi if isinstance(cpi, int) and not isinstance(cpi, bool) and cpi > 0 else None

    def count(kind):
        block = info.get(kind)
        value = block.get("count") if isinstance(block, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    fewer = [r["image"] for r in dset.records if cpi is not None and len(r["captions"]) < cpi]
    kinds = {kind: count(kind) for kind in ("failed", "short", "unreadable")}
    if not fewer and not any(kinds.values()):
        return []
    parts = [f"{n} {kind}" for kind, n in kinds.items() if n]
    head = (f"{len(fewer)} image(s) have fewer than {cpi} captions" if cpi is not None
            else "captioning did not finish")
    example = f", e.g. {', '.join(fewer[:3])}{' ...' if len(fewer) > 3 else ''}" if fewer else ""
    return [f"{dset.folder / MANIFEST_FILE}: caption synthesis asked for {cpi or '?'} per image; {head}"
            f"{example} ({', '.join(parts) or 'not recorded as failed'}); rerun the caption script to fill them"]
