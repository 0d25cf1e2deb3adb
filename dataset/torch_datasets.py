"""torch Datasets for training (one random caption per image) and retrieval evaluation (index maps)."""
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.common.errors import fail
from utils.common.seeding import derive_seed

from .images import load_image
from .karpathy import eval_from_groups, group_by_image


def to_tensor(image) -> torch.Tensor:
    """PIL RGB image -> float tensor [3,H,W] in [0, 1] (the default transform)."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


EPOCH_UNITS = ("pairs", "images")


class ImageCaptionTrainDataset(Dataset):
    """Items {"pixel_values", "caption", "index"} ("index": the image's index in `groups`).

    unit "images" (default): item i is image i with one of its captions drawn at random.
    unit "pairs": item k is the k-th (image, caption) pair, every caption of every image once per
    pass (the public EDGE code's epoch: 5 items per image on Flickr30K and COCO).

    The draw depends only on (seed, epoch, i), so it is reproducible, independent of worker and
    process count, and changes from epoch to epoch through `use_epoch`. (Not named `set_epoch`: accelerate's
    DataLoaderShard calls `dataset.set_epoch(its own iteration counter)` at every pass, and that counter
    restarts at 0 after a resume, so resumed epochs would draw the captions of epoch 0, 1, ...)
    """

    resolution = None  # the size the transform resizes to: far smaller images get a one-time warning

    def __init__(self, groups, image_root, transform=None, seed: int = 0, unit: str = "images"):
        if unit not in EPOCH_UNITS:
            raise fail(f"--epoch_unit must be one of {', '.join(EPOCH_UNITS)}, got '{unit}'")
        if not groups:
            raise fail(f"training set under {image_root} has no images")
        for g in groups:
            if not g.get("captions"):
                raise fail(f"training image {g.get('image')} has no captions")
        self.groups = list(groups)
        self.image_root = Path(image_root)
        self.transform = transform or to_tensor
        self.seed = int(seed)
        self.epoch = 0
        self.unit = unit
        self.pairs = ([(i, j) for i, g in enumerate(self.groups) for j in range(len(g["captions"]))]
                      if unit == "pairs" else None)

    def with_unit(self, unit: str) -> "ImageCaptionTrainDataset":
        """The same images, transform and seed read in another epoch unit."""
        return ImageCaptionTrainDataset(self.groups, self.image_root, self.transform, self.seed, unit)

    @classmethod
    def from_train_entries(cls, entries, image_root, transform=None, seed: int = 0, unit: str = "images"):
        """Build from Karpathy train entries (one per caption)."""
        return cls(group_by_image(entries), image_root, transform, seed, unit)

    @classmethod
    def from_distilled(cls, distilled_set, transform=None, seed: int = 0, unit: str = "images"):
        """Build from a `dataset.distilled.DistilledSet`."""
        return cls(distilled_set.groups, distilled_set.folder, transform, seed, unit)

    def use_epoch(self, epoch: int) -> None:
        """Choose which caption each image gets this epoch."""
        self.epoch = int(epoch)

    def caption_index(self, i: int) -> int:
        """Index of the caption of image i drawn for the current epoch."""
        n = len(self.groups[i]["captions"])
        return random.Random(derive_seed(derive_seed(self.seed, self.epoch), i)).randrange(n) if n > 1 else 0

    def item_ref(self, k: int) -> tuple:
        """(image index, caption index) of item k in the current epoch."""
        if self.pairs is not None:
            return self.pairs[k]
        return k, self.caption_index(k)

    @property
    def num_images(self) -> int:
        return len(self.groups)

    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else len(self.groups)

    def __getitem__(self, k: int) -> dict:
        i, j = self.item_ref(k)
        group = self.groups[i]
        image = load_image(self.image_root / group["image"], self.resolution)
        return {"pixel_values": self.transform(image), "caption": group["captions"][j], "index": i}


class RetrievalEvalDataset(Dataset):
    """Images of an eval split with index maps: `texts`, `img2txt[i]` -> caption ids, `txt2img[t]` -> image id.

    Items are (image tensor, image index).
    """

    resolution = None  # the size the transform resizes to: far smaller images get a one-time warning

    def __init__(self, eval_entries, image_root, transform=None):
        if not eval_entries:
            raise fail(f"evaluation split under {image_root} has no images")
        self.entries = list(eval_entries)
        self.image_root = Path(image_root)
        self.transform = transform or to_tensor
        self.images = [e["image"] for e in self.entries]
        self.texts, self.img2txt, self.txt2img = [], [], []
        for i, entry in enumerate(self.entries):
            captions = [entry["caption"]] if isinstance(entry["caption"], str) else entry["caption"]
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(captions))))
            self.texts.extend(captions)
            self.txt2img.extend([i] * len(captions))

    @classmethod
    def from_distilled(cls, distilled_set, transform=None):
        """Build from a `dataset.distilled.DistilledSet` (all captions of each image)."""
        return cls(eval_from_groups(distilled_set.groups), distilled_set.folder, transform)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        return self.transform(load_image(self.image_root / self.images[i], self.resolution)), i
