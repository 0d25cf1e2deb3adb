"""Data set names -> annotation files and image roots (BLIP/LoRS file names)."""
import re
from pathlib import Path
from typing import NamedTuple

from utils.common.errors import fail

from .cc3m import cc3m_eval_entries, read_cc3m_folder
from .karpathy import read_karpathy_eval, read_karpathy_train

DATASETS = ("flickr30k", "coco", "cc3m", "procedural", "karpathy")
SPLITS = ("train", "val", "test")

_HOW_TO_GET = {
    "flickr30k": ("download the Karpathy-split JSON files distributed with BLIP/LoRS (flickr30k_train.json, "
                  "flickr30k_val.json, flickr30k_test.json) into the annotation folder, and the Flickr30K images "
                  "from the official Flickr30K site into the image root (so that flickr30k-images/... resolves)"),
    "coco": ("download the Karpathy-split JSON files distributed with BLIP/LoRS (coco_karpathy_train.json, "
             "coco_karpathy_val.json, coco_karpathy_test.json) into the annotation folder, and the COCO 2014 "
             "train/val images from the official COCO site into the image root (so that val2014/... resolves)"),
    "cc3m": ("provide cc3m_{split}.json in the Karpathy format, or an img2dataset download of CC3M "
             "(image + .txt caption per sample) in <root>/{split}/"),
    "procedural": "make the set with: python -m dataset.procedural --output_dir <folder>",
    "karpathy": "provide {split}.json or <name>_{split}.json in the Karpathy format in the annotation folder",
}


def _candidates(dataset: str, split: str, ann_root: Path) -> list:
    if dataset == "flickr30k":
        return [ann_root / f"flickr30k_{split}.json"]
    if dataset == "coco":
        return [ann_root / f"coco_karpathy_{split}.json"]
    if dataset == "cc3m":
        return [ann_root / f"cc3m_{split}.json", ann_root / f"cc3m_{split}_subset.json"]
    if dataset == "procedural":
        return [ann_root / "annotations" / f"procedural_{split}.json", ann_root / f"procedural_{split}.json"]
    # karpathy: lenient
    found = [ann_root / f"{split}.json"] + sorted(ann_root.glob(f"*_{split}.json")) if ann_root.is_dir() else []
    return found or [ann_root / f"{split}.json", ann_root / f"<name>_{split}.json"]


_SPLIT_WORDS = {"train": "train", "val": "val", "validation": "val", "dev": "val", "test": "test"}


def splits_named_by(path) -> set:
    """Splits a file name names ("flickr30k_test.json" -> {"test"}; "captions.json" -> set())."""
    words = re.split(r"[^a-z0-9]+", Path(path).stem.lower())
    return {_SPLIT_WORDS[w] for w in words if w in _SPLIT_WORDS}


def _check_single_file_split(dataset: str, split: str, ann_file: Path) -> None:
    """A single annotation file stands for one split: the one its name says.

    An evaluation split (val/test) needs a file whose name names it; the train split accepts a file
    that names no split (a custom caption file) but not a val/test file.
    """
    named = splits_named_by(ann_file)
    if split in named and len(named) == 1:
        return
    if split == "train" and not named:
        return
    what = f"names the {'/'.join(sorted(named))} split" if named else "names no split"
    raise fail(f"{dataset} {split}: the annotation file {ann_file} {what}, so it is not used as the {split} "
               f"split; pass the annotation folder (with the {split} file) or a file named like "
               f"<name>_{split}.json")


def resolve_split(dataset: str, split: str, ann_root, image_root=None) -> tuple:
    """(annotation file, image root) of a split; raises InputError saying what was looked for.

    `ann_root` may also be the annotation file itself, for the split its name names (val/test only then;
    train also from a file that names no split). The image root defaults to the annotation
    folder (for "procedural": the data set folder, which holds images/). For "cc3m" without a JSON
    file, an img2dataset folder <ann_root>/<split>/ is returned in place of the file.
    """
    if dataset not in DATASETS:
        raise fail(f"unknown data set {dataset!r}; known: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise fail(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if ann_root is None:
        raise fail(f"{dataset}: no annotation folder given; {_HOW_TO_GET[dataset].format(split=split)}")
    ann_root = Path(ann_root)
    if ann_root.is_file():
        _check_single_file_split(dataset, split, ann_root)
        ann_file = ann_root
    else:
        candidates = _candidates(dataset, split, ann_root)
        ann_file = next((c for c in candidates if c.is_file()), None)
        if ann_file is None and dataset == "cc3m" and (ann_root / split).is_dir():
            ann_file = ann_root / split
        if ann_file is None:
            looked = ", ".join(str(c) for c in candidates)
            raise fail(f"{dataset} {split} annotations not found: looked for {looked}; "
                       f"{_HOW_TO_GET[dataset].format(split=split)}")
    if ann_file.is_dir():
        image_root = ann_file  # img2dataset entries are relative to the split folder
    elif image_root is None:
        if dataset == "procedural" and ann_file.parent.name == "annotations":
            image_root = ann_file.parent.parent
        else:
            image_root = ann_file.parent
    return ann_file, Path(image_root)


class Split(NamedTuple):
    """A split's entries with the annotation file (or cc3m folder) and image root they were read from."""

    entries: list
    ann_file: Path
    image_root: Path


def read_split(dataset: str, split: str, ann_root, image_root=None, check_images: bool = True) -> Split:
    """The entries of a split with the paths `resolve_split` found for them (resolved once)."""
    ann_file, image_root = resolve_split(dataset, split, ann_root, image_root)
    if ann_file.is_dir():  # cc3m img2dataset folder; image paths are relative to it
        entries = read_cc3m_folder(ann_file) if split == "train" else cc3m_eval_entries(ann_file)
    elif split == "train":
        entries = read_karpathy_train(ann_file, image_root, check_images=check_images)
    else:
        entries = read_karpathy_eval(ann_file, image_root, check_images=check_images)
    return Split(entries, ann_file, image_root)


def load_split(dataset: str, split: str, ann_root, image_root=None, check_images: bool = True) -> list:
    """Train entries (split "train") or eval entries (val/test) of a named data set."""
    return read_split(dataset, split, ann_root, image_root, check_images).entries
