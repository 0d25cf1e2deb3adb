"""Training data: the data set of --dataset/--train_data_dir, its flags, transform, epoch order, batches,
step counts."""
import math

import torch
from torch.utils.data import Sampler

from utils.common.errors import fail
from utils.common.seeding import derive_seed


def add_data_flags(a) -> None:
    """Model, data and the training images' preprocessing: the flags stage 1 and VAE pre-training share."""
    from dataset.registry import DATASETS

    a("--pretrained_model_name_or_path", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
      help="hub id or diffusers folder of the Stable Diffusion model to train")
    a("--dataset", choices=DATASETS, default="flickr30k")
    a("--ann_root", default=None, help="annotation folder (or file) of --dataset")
    a("--image_root", default=None, help="image folder (default: per data set, see dataset/registry.py)")
    a("--train_data_dir", default=None, help="train on a distilled-set folder instead of --dataset")
    a("--max_train_samples", type=int, default=None, help="use only the first N training images")
    a("--output_dir", required=False, default=None)
    a("--overwrite_output_dir", action="store_true", help="replace a different run already in --output_dir")
    a("--resolution", type=int, default=512)
    a("--center_crop", action="store_true", default=True)
    a("--random_crop", dest="center_crop", action="store_false")
    a("--random_flip", action="store_true")
    a("--dataloader_num_workers", type=int, default=0)


def check_common_flags(args) -> None:
    """The checks stage 1 and VAE pre-training share (output folder, data, sizes, steps); one-line InputError each."""
    if not args.output_dir:
        raise fail("--output_dir is required")
    if not args.train_data_dir and not args.ann_root:
        raise fail(f"need --ann_root (annotations of --dataset {args.dataset}) or --train_data_dir")
    for name in ("train_batch_size", "resolution", "num_train_epochs"):
        if getattr(args, name) < 1:
            raise fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise fail(f"--max_train_steps must be at least 1, got {args.max_train_steps}")
    if args.learning_rate <= 0:
        raise fail(f"--learning_rate must be positive, got {args.learning_rate}")


class EpochShuffleSampler(Sampler):
    """A permutation of range(n) fixed by (seed, epoch); `use_epoch` selects the epoch.

    (Named `use_epoch`, not `set_epoch`, so accelerate's own iteration counter never overrides it.)
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


def build_train_transform(resolution: int, center_crop: bool = True, random_flip: bool = False):
    """PIL image -> tensor in [-1, 1] at resolution x resolution (resize shorter side, crop, optional flip)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
        transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])


def build_train_dataset(args, transform, unit: str = None):
    """The training set named by --dataset/--ann_root/--image_root, or a distilled set in --train_data_dir.

    unit: what one epoch passes over, "pairs" or "images" (default: --epoch_unit).
    """
    unit = unit or getattr(args, "epoch_unit", "pairs")
    from dataset.torch_datasets import ImageCaptionTrainDataset

    if args.train_data_dir:
        from dataset.distilled import read_distilled_set

        ds = ImageCaptionTrainDataset.from_distilled(read_distilled_set(args.train_data_dir), transform,
                                                     seed=args.seed, unit=unit)
        ds.resolution = args.resolution
        return ds
    from dataset.karpathy import group_by_image
    from dataset.registry import read_split

    entries, _, image_root = read_split(args.dataset, "train", args.ann_root, args.image_root)
    groups = group_by_image(entries)
    if args.max_train_samples:
        groups = groups[: args.max_train_samples]
    ds = ImageCaptionTrainDataset(groups, image_root, transform, seed=args.seed, unit=unit)
    ds.resolution = args.resolution
    return ds


def dataset_unit(dataset) -> str:
    """What one item of the training dataset (or its caption-only wrapper) is: "pairs" or "images"."""
    return getattr(getattr(dataset, "base", dataset), "unit", "images")


def total_train_steps(n_items: int, batch_size: int, num_epochs: int, num_processes: int = 1,
                      accumulation: int = 1, drop_last: bool = True) -> int:
    """Optimizer steps of `num_epochs` passes over `n_items` (pairs or images), as `train` counts them.

    drop_last: the contrastive term drops each epoch's incomplete batch (it needs full batches).
    """
    batches = n_items // batch_size if drop_last else math.ceil(n_items / batch_size)
    return num_epochs * math.ceil(math.ceil(batches / num_processes) / accumulation)


def collate(items) -> dict:
    """Stack pixels; keep captions as a list."""
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "caption": [it["caption"] for it in items],
            "index": torch.tensor([it["index"] for it in items])}
