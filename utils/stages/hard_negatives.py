"""Hard-negative batches: each batch holds images whose captions the EDGE scorer finds alike.

With random batches most in-batch negatives of the contrastive term differ from the positive in many
ways at once (other colour, other shape, other scene) and are easy. Here the images are clustered by
k-means on the scorer's text features (mean over each image's captions), with about two batches of
images per cluster and a new clustering every epoch, and a batch is cut from one cluster, so its
negatives are the captions nearest to the positive in the scorer's own space.
"""
import random

import torch
from torch.utils.data import Sampler
from tqdm.auto import tqdm

from utils.common.seeding import derive_seed
from utils.stages.prompt_coverage import kmeans

IMAGES_PER_CLUSTER_IN_BATCHES = 2


def image_text_features(groups: list, encode_text, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """[n_images, d] unit-norm mean of each image's caption features under `encode_text(list) -> [n, d]`."""
    captions = sorted({c for g in groups for c in g["captions"]})
    row = {c: i for i, c in enumerate(captions)}
    chunks = []
    with torch.no_grad():
        for s in tqdm(range(0, len(captions), batch_size), desc="scorer text features", disable=not progress):
            chunks.append(encode_text(captions[s:s + batch_size]).float().cpu())
    feats = torch.nn.functional.normalize(torch.cat(chunks), dim=1)
    per_image = torch.stack([feats[[row[c] for c in g["captions"]]].mean(0) for g in groups])
    return torch.nn.functional.normalize(per_image, dim=1)


def similar_caption_order(features: torch.Tensor, item_image: list, batch_size: int, seed: int) -> list:
    """A permutation of the items in which each run of `batch_size` comes from one k-means cluster of images.

    features: [n_images, d]; item_image[k]: the image of item k (several items per image with --epoch_unit
    pairs). Within a cluster the items go round its images (every image's first item, then every second
    one, ...), so one image repeats inside a batch only when its cluster has fewer images than a batch.
    The items left over after each cluster's full batches are pooled, shuffled and cut into mixed batches;
    the batches are then shuffled. Deterministic in `seed`.
    """
    n_images = features.shape[0]
    k = max(1, n_images // (IMAGES_PER_CLUSTER_IN_BATCHES * batch_size))
    _, assign = kmeans(features, k, seed)
    rng = random.Random(seed)
    by_image = {}
    for item, image in enumerate(item_image):
        by_image.setdefault(int(image), []).append(item)
    batches, leftovers = [], []
    for c in range(k):
        images = [i for i in torch.nonzero(assign == c).flatten().tolist() if i in by_image]
        rng.shuffle(images)
        for i in images:
            rng.shuffle(by_image[i])
        depth = max((len(by_image[i]) for i in images), default=0)
        order = [by_image[i][r] for r in range(depth) for i in images if r < len(by_image[i])]
        full = len(order) // batch_size * batch_size
        batches += [order[s:s + batch_size] for s in range(0, full, batch_size)]
        leftovers += order[full:]
    rng.shuffle(leftovers)
    batches += [leftovers[s:s + batch_size] for s in range(0, len(leftovers), batch_size)]
    tail = batches.pop() if batches and len(batches[-1]) < batch_size else []
    rng.shuffle(batches)
    return [item for b in batches for item in b] + tail


class HardNegativeSampler(Sampler):
    """EpochShuffleSampler's interface (`use_epoch`), yielding `similar_caption_order` for (seed, epoch)."""

    def __init__(self, features: torch.Tensor, item_image: list, batch_size: int, seed: int):
        self.features, self.item_image = features, list(item_image)
        self.batch_size, self.seed, self.epoch = int(batch_size), int(seed), 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        return iter(similar_caption_order(self.features, self.item_image, self.batch_size,
                                          derive_seed(self.seed, self.epoch)))

    def __len__(self):
        return len(self.item_image)
