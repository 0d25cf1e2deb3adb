"""The data of an evaluation run, in memory: the training set (a distilled set, a LoRS .pt or a real-data
baseline) and the test/val splits, as uint8 images at the run's size with cached frozen text features."""
import random
import sys
from functools import partial
from pathlib import Path

import torch.nn.functional as F

from utils.common.errors import fail


def eval_split(args, split, size, text_encoder, cache_dir):
    """A test/val split in memory: uint8 images at `size`, cached text features, the index maps."""
    from dataset.registry import read_split
    from dataset.torch_datasets import RetrievalEvalDataset

    from evaluation.train_retrieval import EvalSplit, cached_text_features, load_images_uint8, resize_to_uint8

    entries, _, image_root = read_split(args.dataset, split, args.ann_root, args.image_root)
    ds = RetrievalEvalDataset(entries, image_root, transform=partial(resize_to_uint8, size=size))
    ds.resolution = size
    if len(ds.texts) == 0:
        raise fail(f"{args.dataset} {split} split has no captions")
    images = load_images_uint8(ds, args.num_workers, desc=f"{split} images")
    feats = cached_text_features(text_encoder, ds.texts, cache_dir)
    return EvalSplit(name=split, images=images, text_features=feats, img2txt=ds.img2txt, txt2img=ds.txt2img)


def native_image_size(args) -> int:
    """Size of the first test image (the procedural set's own resolution)."""
    from dataset.images import load_image
    from dataset.registry import read_split

    entries, _, image_root = read_split(args.dataset, "test", args.ann_root, args.image_root, check_images=False)
    first = entries[0]
    w, h = load_image(Path(image_root) / first["image"]).size
    return max(w, h)


def train_groups(args):
    """(groups [{"image", "captions"}], image root) of a distilled set or a real-data baseline."""
    from dataset.karpathy import group_by_image
    from dataset.registry import read_split

    if args.distill_dir:
        from dataset.distilled import caption_warnings, read_distilled_set, real_twin_groups

        ds = read_distilled_set(args.distill_dir)
        if len(ds) == 0:
            raise fail(f"distilled set {args.distill_dir} has no images")
        for line in caption_warnings(ds):
            print(f"warning: {line}", file=sys.stderr)
        if not args.real_twin:
            return ds.groups, Path(ds.folder)
    entries, _, image_root = read_split(args.dataset, "train", args.ann_root, args.image_root)
    groups = group_by_image(entries)
    if args.real_twin:
        return real_twin_groups(ds, groups), image_root
    if args.baseline == "full":
        return groups, image_root
    if args.n > len(groups):
        raise fail(f"--n {args.n} exceeds the {len(groups)} images of the {args.dataset} train split")
    rng = random.Random(args.seed)
    chosen = sorted(rng.sample(range(len(groups)), args.n))
    k = args.captions_per_image
    return [{**groups[i], "captions": rng.sample(groups[i]["captions"], min(k, len(groups[i]["captions"])))
             if k > 1 else [rng.choice(groups[i]["captions"])]} for i in chosen], image_root


def build_train_set(args, size, text_encoder, cache_dir, lors=None):
    """The training set in memory (TrainSet) and a description of it for results.json (`lors`: the --lors_pt
    set when already read)."""
    from dataset.torch_datasets import ImageCaptionTrainDataset

    from evaluation.train_retrieval import TrainSet, cached_text_features, load_images_uint8, resize_to_uint8

    if args.lors_pt:
        from dataset.lors import read_lors_pt

        lors = lors or read_lors_pt(args.lors_pt)
        if lors.text_embed.shape[1] != text_encoder.dim:
            raise fail(f"{args.lors_pt}: text embeddings have dim {lors.text_embed.shape[1]} but text encoder "
                       f"{args.text_encoder!r} gives {text_encoder.dim}; pass the encoder the set was made with")
        from evaluation.protocol import lors_pixels

        images = lors.images
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        images = lors_pixels(images)  # saved CLIP-normalised; the run normalises train and test alike
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        train = TrainSet(images=images.contiguous(), caption_ids=[[i] for i in range(len(lors))],
                         text_features=lors.text_embed, name=str(args.lors_pt))
        return train, {"n_images": len(lors), "n_captions": len(lors), "source": str(args.lors_pt)}
    groups, image_root = train_groups(args)
    captions, caption_ids = [], []
    for g in groups:
        caption_ids.append(list(range(len(captions), len(captions) + len(g["captions"]))))
        captions.extend(g["captions"])
    ds = ImageCaptionTrainDataset(groups, image_root, transform=partial(resize_to_uint8, size=size))
    ds.resolution = size
    images = load_images_uint8(ds, args.num_workers, desc="train images")
    feats = cached_text_features(text_encoder, captions, cache_dir)
    train = TrainSet(images=images, caption_ids=caption_ids, text_features=feats, name=str(image_root))
    info = {"n_images": len(groups), "n_captions": len(captions), "source": str(args.distill_dir or image_root),
            "images": [g["image"] for g in groups] if len(groups) <= 2000 else None}
    return train, info
