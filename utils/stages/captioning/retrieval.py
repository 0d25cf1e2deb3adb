"""Offline backend: each image gets the real training captions a scorer ranks highest for it.

No generative model and no network: the K-1 nearest captions of the real train pool (by the
scorer's image-text similarity), skipping the image's own prompt and its exact duplicates.
The pool's text features are computed once and saved, keyed by scorer spec and pool content.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dataset.images import load_image
from utils.common.atomic_io import cached_tensor
from utils.common.errors import fail

from .backend import CaptionBackend
from .cleaning import caption_key
from .hf_models import caption_device

DEFAULT_SCORER = "open_clip:ViT-B-32/openai"
TEXT_BATCH = 256
EXTRA_CANDIDATES = 64  # looked at beyond n before falling back to a full sort (duplicates of the prompt)


def image_to_pixels(image: Image.Image, size) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float tensor in [-1, 1] at `size` (H, W)."""
    h, w = size
    if image.size != (w, h):
        image = image.resize((w, h), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0


def rank_pool(sims: torch.Tensor, pool: list, prompt: str, n: int) -> list:
    """The `n` best-scoring pool captions by `sims` [P], skipping the prompt and repeats (by caption_key)."""
    seen, out = {caption_key(prompt)}, []
    k = min(len(pool), n + EXTRA_CANDIDATES)
    order = torch.topk(sims, k).indices.tolist()
    if k < len(pool):
        order = order + [i for i in torch.argsort(sims, descending=True).tolist()[k:]]
    for i in order:
        key = caption_key(pool[i])
        if key and key not in seen:
            seen.add(key)
            out.append(pool[i])
            if len(out) == n:
                break
    return out


class RetrievalBackend(CaptionBackend):
    """Nearest real captions under a frozen image-text scorer (`utils.models.scorers` spec)."""

    name = "retrieval"
    strip_boilerplate = False  # human captions are kept as they are
    deterministic = True

    def __init__(self, scorer=DEFAULT_SCORER, dataset=None, ann_root=None, image_root=None, batch_size=32):
        from dataset.registry import load_split

        self.scorer_spec, self.dataset, self.batch_size = scorer, dataset, batch_size
        if dataset is None:
            raise fail("--dataset is required: the real training pool the captions are taken from")
        entries = load_split(dataset, "train", ann_root, image_root, check_images=False)
        self.pool = list(dict.fromkeys(" ".join(e["caption"].split()) for e in entries if e.get("caption")))
        if not self.pool:
            raise fail(f"{dataset} train split under {ann_root} has no captions")
        blob = json.dumps([scorer, self.pool], ensure_ascii=False).encode("utf-8")
        self.pool_hash = hashlib.sha256(blob).hexdigest()[:16]
        self.ann_root = str(ann_root)
        self.work_dir = None  # set by the runner: where the pool features are saved
        self.scorer = self.text_features = None

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.scorer_spec,
                "instruction": "nearest captions of the real train pool by scorer similarity",
                "settings": {"dataset": self.dataset, "ann_root": self.ann_root, "pool_size": len(self.pool),
                             "pool_hash": self.pool_hash}}

    def cache_identity(self) -> dict:
        return {"backend": self.name, "scorer": self.scorer_spec, "pool_hash": self.pool_hash}

    def setup(self) -> None:
        from utils.models.scorers import build_scorer

        self.scorer = build_scorer(self.scorer_spec, caption_device())
        self.text_features = self._pool_features()

    def _pool_features(self) -> torch.Tensor:
        path = Path(self.work_dir) / f"pool_text_{self.pool_hash}.pt" if self.work_dir else None

        def compute():
            chunks = [self.scorer.encode_text(self.pool[i:i + TEXT_BATCH]).float().cpu()
                      for i in tqdm(range(0, len(self.pool), TEXT_BATCH), desc="encoding caption pool",
                                    leave=False)]
            return torch.cat(chunks)

        feats = cached_tensor(path, compute, lambda t: t.shape[0] == len(self.pool))
        return feats.to(self.scorer.device)

    @torch.no_grad()
    def generate(self, requests):
        size = tuple(self.scorer.image_size)
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            pixels = torch.stack([image_to_pixels(load_image(r.image_path), size) for r in batch])
            sims = self.scorer.encode_image(pixels).float() @ self.text_features.T
            for r, row in zip(batch, sims.cpu()):
                yield r, rank_pool(row, self.pool, r.prompt, r.n)
