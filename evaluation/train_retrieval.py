"""Training and evaluating the protocol's retrieval model on in-memory image tensors and cached text features.

Images are decoded and resized once into a uint8 tensor (LoRS sets arrive as float pixels, de-normalised);
the frozen text encoder runs once per caption list, its output cached in memory and on disk. Training and
test images reach the encoder through the same `encoder_input` (one normalisation per run). What an epoch
is depends on the protocol (evaluation/protocol.py): "lors", every training image once with one of its
captions drawn at random; "edge", every (image, caption) pair once, full batches only, the images
augmented. Both are seeded by run seed and epoch.
"""
import hashlib
from contextlib import nullcontext
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from utils.common.atomic_io import cached_tensor
from utils.common.errors import fail
from utils.common.seeding import derive_seed, seed_everything
from utils.models.retrieval_model import RetrievalModel, normalize_pixels

from .metrics import itm_recalls
from .protocol import edge_train_augment
from .x0_augment import x0_degrade

SELECTION_RULES = ("last", "best_val", "best_test")
SELECTION_LABELS = {
    "last": "last epoch",
    "best_val": "best epoch on val",
    "best_test": "best epoch on test (optimistic, LoRS rule)",
}


# ----------------------------------------------------------------------------- data held in memory


@dataclass
class TrainSet:
    """Training images with caption ids into a text-feature table.

    images: uint8 [N,3,S,S] pixels, or float [N,3,S,S] pixels on the [0, 1] scale (LoRS sets, de-normalised;
    not clipped). caption_ids[i]: rows of `text_features` that caption image i.
    """
    images: torch.Tensor
    caption_ids: list
    text_features: torch.Tensor
    name: str = "train"

    def __post_init__(self):
        if self.images.shape[0] == 0:
            raise fail(f"{self.name}: the training set has no images")
        if len(self.caption_ids) != self.images.shape[0]:
            raise fail(f"{self.name}: {self.images.shape[0]} images but {len(self.caption_ids)} caption lists")
        for i, ids in enumerate(self.caption_ids):
            if not ids:
                raise fail(f"{self.name}: training image {i} has no caption")


@dataclass
class EvalSplit:
    """An evaluation split: uint8 images, text features and BLIP index maps."""
    name: str
    images: torch.Tensor
    text_features: torch.Tensor
    img2txt: list
    txt2img: list = field(default_factory=list)


def encoder_input(pixels: torch.Tensor, preprocess: dict) -> torch.Tensor:
    """uint8 pixels (or float pixels on the [0, 1] scale) -> the encoder's input: the one normalisation a run
    applies to training and test images alike."""
    pixels = pixels.float().div_(255.0) if pixels.dtype == torch.uint8 else pixels.float()
    return normalize_pixels(pixels, preprocess)


def resize_to_uint8(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> uint8 tensor [3,size,size] (bicubic resize to a square, as the protocol's loaders do)."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def load_images_uint8(dataset, num_workers: int = 0, desc: str = "images", batch_size: int = 64) -> torch.Tensor:
    """Decode every item of a dataset whose items are (uint8 tensor, ...) or {"pixel_values": ...} into one tensor."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_stack_pixels)
    return torch.cat([batch for batch in tqdm(loader, desc=f"loading {desc}", leave=False)])


def _stack_pixels(items):
    return torch.stack([it["pixel_values"] if isinstance(it, dict) else it[0] for it in items])


# ----------------------------------------------------------------------------- text features


_MEMORY_CACHE = {}


def caption_list_key(encoder_name: str, captions) -> str:
    """Cache key of a caption list under one encoder: sha256 of the name and the captions."""
    digest = hashlib.sha256(encoder_name.encode("utf-8"))
    for caption in captions:
        digest.update(b"\0" + caption.encode("utf-8"))
    return digest.hexdigest()


def cached_text_features(text_encoder, captions, cache_dir=None, batch_size: int = 256) -> torch.Tensor:
    """Frozen features [len(captions), dim] of `captions`, from the memory cache, the disk cache, or computed."""
    captions = list(captions)
    key = caption_list_key(text_encoder.name, captions)
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    path = None
    if cache_dir is not None:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", text_encoder.name)[-60:]
        path = Path(cache_dir) / f"{safe}-{key[:24]}.pt"

    def compute():
        chunks = []
        for start in tqdm(range(0, len(captions), batch_size), desc=f"text features ({text_encoder.name})",
                          leave=False):
            chunks.append(text_encoder.encode(captions[start:start + batch_size], batch_size=batch_size))
        feats = torch.cat(chunks) if chunks else torch.zeros(0, text_encoder.dim)
        return feats.float().contiguous()

    feats = cached_tensor(path, compute, lambda t: t.shape == (len(captions), text_encoder.dim))
    _MEMORY_CACHE[key] = feats
    return feats


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_split(model: RetrievalModel, split: EvalSplit, preprocess: dict, batch_size: int,
                   device, autocast=None) -> dict:
    """BLIP recalls of `model` on an evaluation split."""
    model.eval()
    img_feats = []
    for start in range(0, split.images.shape[0], batch_size):
        pixels = encoder_input(split.images[start:start + batch_size].to(device), preprocess)
        with autocast() if autocast else nullcontext():
            img_feats.append(model.image_features(pixels).float())
    txt_feats = []
    for start in range(0, split.text_features.shape[0], 4096):
        with autocast() if autocast else nullcontext():
            txt_feats.append(model.text_features(split.text_features[start:start + 4096].to(device)).float())
    scores = (torch.cat(img_feats) @ torch.cat(txt_feats).t()).cpu().numpy()
    return itm_recalls(scores, scores.T, split.img2txt, split.txt2img)


# ----------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Protocol hyper-parameters (defaults: MTT-VL / LoRS evaluation)."""
    epochs: int = 100
    eval_every: int = 5
    batch_size_train: int = 128
    batch_size_test: int = 128
    lr_img: float = 0.1
    lr_txt: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "step"  # "step": x0.1 after epochs//2 (LoRS MultiStepLR), "constant"
    eval_val: bool = False
    pairs: str = "one_caption_per_image"  # or "every_caption" (edge protocol)
    augment: str = "none"  # or "randaugment" (edge protocol, training images only)
    drop_last: bool = False  # drop the last partial batch (edge protocol)
    x0_augment: bool = False  # also degrade training images like a one-step x0 estimate (a scorer for EDGE)


def epoch_batches(train: TrainSet, cfg: TrainConfig, seed: int, epoch: int) -> list:
    """The epoch's batches as (image indices, text-feature rows) tensor pairs, seeded by (seed, epoch).

    one_caption_per_image: every image once, with one of its captions drawn at random.
    every_caption: every (image, caption) pair once, shuffled. A batch of fewer than 2 items is skipped
    (a contrastive batch needs negatives); with `drop_last` every partial batch is.
    """
    gen = torch.Generator().manual_seed(derive_seed(seed, epoch))
    n = train.images.shape[0]
    if cfg.pairs == "one_caption_per_image":
        order = torch.randperm(n, generator=gen)
        pick = (torch.rand(n, generator=gen) * torch.tensor([len(c) for c in train.caption_ids])).long()
        images = order
        texts = torch.tensor([train.caption_ids[i][pick[i]] for i in order.tolist()], dtype=torch.long)
    elif cfg.pairs == "every_caption":
        pair_images = torch.tensor([i for i, ids in enumerate(train.caption_ids) for _ in ids], dtype=torch.long)
        pair_texts = torch.tensor([t for ids in train.caption_ids for t in ids], dtype=torch.long)
        order = torch.randperm(pair_images.numel(), generator=gen)
        images, texts = pair_images[order], pair_texts[order]
    else:
        raise fail(f"unknown pairing {cfg.pairs!r}; use one_caption_per_image or every_caption")
    batches = []
    for start in range(0, images.numel(), cfg.batch_size_train):
        idx = images[start:start + cfg.batch_size_train]
        if idx.numel() < 2 or (cfg.drop_last and idx.numel() < cfg.batch_size_train):
            continue
        batches.append((idx, texts[start:start + cfg.batch_size_train]))
    return batches


def num_training_items(train: TrainSet, cfg: TrainConfig) -> int:
    """Items one epoch draws from: images (one_caption_per_image) or (image, caption) pairs (every_caption)."""
    return sum(len(c) for c in train.caption_ids) if cfg.pairs == "every_caption" else train.images.shape[0]


def eval_epochs(epochs: int, eval_every: int) -> list:
    """1-based epochs after which the model is evaluated: every `eval_every`, and always the last."""
    if epochs < 1 or eval_every < 1:
        raise fail(f"--epochs and --eval_every must be at least 1 (got {epochs}, {eval_every})")
    return sorted(set(range(eval_every, epochs + 1, eval_every)) | {epochs})


def train_retrieval(model: RetrievalModel, train: TrainSet, test: EvalSplit, preprocess: dict, cfg: TrainConfig,
                    accelerator, seed: int, val: EvalSplit = None, progress: bool = True) -> list:
    """Train `model` on `train`, evaluating on `test` (and `val`) at `eval_epochs`; returns the history.

    History entries: {"epoch", "loss", "test": recalls, "val": recalls (when evaluated)}.
    """
    seed_everything(seed)
    optimizer = torch.optim.SGD([
        {"params": model.image_encoder.parameters(), "lr": cfg.lr_img},
        {"params": model.text_projection.parameters(), "lr": cfg.lr_txt},
    ], lr=cfg.lr_img, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.lr_schedule == "step":
        # LoRS: MultiStepLR(milestones=[Epoch//2+1]) stepped after each of Epoch+1 epochs (0-based).
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[cfg.epochs // 2 + 1], gamma=0.1)
    elif cfg.lr_schedule == "constant":
        scheduler = None
    else:
        raise fail(f"unknown lr schedule {cfg.lr_schedule!r}; use step or constant")
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    unwrapped = accelerator.unwrap_model(model)
    checkpoints = set(eval_epochs(cfg.epochs, cfg.eval_every))
    if cfg.augment not in ("none", "randaugment"):
        raise fail(f"unknown augmentation {cfg.augment!r}; use none or randaugment")
    history = []
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"seed {seed}", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        aug_gen = torch.Generator().manual_seed(derive_seed(derive_seed(seed, epoch), 1))
        total, count = 0.0, 0
        for idx, text_ids in epoch_batches(train, cfg, seed, epoch):
            pixels = train.images[idx]
            if cfg.augment == "randaugment":
                pixels = edge_train_augment(pixels, aug_gen)
            if cfg.x0_augment:
                pixels = x0_degrade(pixels, aug_gen)
            pixels = encoder_input(pixels.to(device), preprocess)
            text = train.text_features[text_ids].to(device)
            with accelerator.autocast():
                loss = model(pixels, text)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            total += loss.item() * idx.numel()
            count += idx.numel()
        if scheduler is not None:
            scheduler.step()
        entry = {"epoch": epoch, "loss": total / max(count, 1)}
        if not math.isfinite(entry["loss"]):
            raise FloatingPointError(f"training loss is {entry['loss']} at epoch {epoch} (seed {seed}); "
                                     f"lower --lr_img/--lr_txt")
        if epoch in checkpoints:
            entry["test"] = evaluate_split(unwrapped, test, preprocess, cfg.batch_size_test, device,
                                           accelerator.autocast)
            if val is not None:
                entry["val"] = evaluate_split(unwrapped, val, preprocess, cfg.batch_size_test, device,
                                              accelerator.autocast)
            bar.set_postfix(loss=f"{entry['loss']:.3f}", r_mean=f"{entry['test']['r_mean']:.1f}")
        history.append(entry)
    bar.close()
    return history


def select_entry(history: list, rule: str) -> dict:
    """The evaluated history entry chosen by `rule` (last | best_val | best_test); ties go to the earliest."""
    evaluated = [h for h in history if "test" in h]
    if not evaluated:
        raise ValueError("no evaluated epoch in the history")
    if rule == "last":
        return evaluated[-1]
    if rule == "best_test":
        return max(evaluated, key=lambda h: (h["test"]["r_mean"], -h["epoch"]))
    if rule == "best_val":
        if any("val" not in h for h in evaluated):
            raise fail("selection best_val needs the val split evaluated at every checkpoint")
        return max(evaluated, key=lambda h: (h["val"]["r_mean"], -h["epoch"]))
    raise fail(f"unknown selection rule {rule!r}; use one of {', '.join(SELECTION_RULES)}")
