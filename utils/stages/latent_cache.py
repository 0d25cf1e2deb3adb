"""Cached VAE posteriors of the training images (`--cache_latents`): encode once, sample every step.

SD's training samples z ~ N(mean, std) from the frozen VAE's posterior at every step. The cache
keeps the posterior's mean and std per image (in the VAE's dtype), and `utils.method.vae_latents.sample_cached_latents`
draws the sample with the same call and generator as `latent_dist.sample(generator)`, so a
cached step equals an uncached one up to the float differences of encoding in other batches.

The pixels must not change between epochs: random crops cannot be cached (the cache refuses);
with random flips both the image and its mirror are cached and each (epoch, image) picks one
with a seeded draw.
"""
import torch
from torch.utils.data import DataLoader, Dataset

from utils.common.errors import fail
from utils.common.seeding import derive_seed
from utils.method.vae_latents import posterior_mean_std


class LatentCache:
    """Posterior mean/std [N, C, h, w] of every training image (and of its mirror when `flips`)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, mean_flip=None, std_flip=None, seed: int = 0):
        self.mean, self.std, self.mean_flip, self.std_flip = mean, std, mean_flip, std_flip
        self.seed = int(seed)

    @property
    def flips(self) -> bool:
        return self.mean_flip is not None

    def __len__(self) -> int:
        return self.mean.shape[0]

    def flip_mask(self, indices, epoch: int) -> torch.Tensor:
        """Which items use the mirrored image this epoch (fair coin per (seed, epoch, image))."""
        epoch_seed = derive_seed(derive_seed(self.seed, 1_000_003), epoch)
        return torch.tensor([derive_seed(epoch_seed, int(i)) % 2 == 1 for i in indices], dtype=torch.bool)

    def lookup(self, indices, epoch: int = 0, device=None) -> tuple:
        """(mean, std) of the items `indices` on `device` (mirrored where this epoch's flip says so)."""
        idx = torch.as_tensor(indices, dtype=torch.long).cpu()
        mean, std = self.mean[idx], self.std[idx]
        if self.flips:
            flip = self.flip_mask(idx.tolist(), epoch).view(-1, 1, 1, 1)
            mean = torch.where(flip, self.mean_flip[idx], mean)
            std = torch.where(flip, self.std_flip[idx], std)
        return mean.to(device), std.to(device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mean, self.std, self.mean_flip, self.std_flip)
                   if t is not None)


@torch.no_grad()
def build_latent_cache(vae, dataset, batch_size: int = 16, flips: bool = False, seed: int = 0,
                       num_workers: int = 0, progress: bool = True) -> LatentCache:
    """Encode every item's "pixel_values" once (and its mirror when `flips`); the cache is kept on the CPU.

    The dataset's transform must be deterministic (no random crop or flip): the cache stands for it.
    """
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=lambda items: (torch.stack([it["pixel_values"] for it in items]),
                                                  torch.tensor([it["index"] for it in items])))
    n = len(dataset)
    store = {}
    for pixels, index in tqdm(loader, desc="caching VAE latents", disable=not progress, leave=False):
        variants = {"": pixels, "_flip": torch.flip(pixels, dims=[-1])} if flips else {"": pixels}
        for suffix, px in variants.items():
            mean, std = posterior_mean_std(vae, px)
            if "mean" + suffix not in store:
                store["mean" + suffix] = torch.empty((n, *mean.shape[1:]), dtype=mean.dtype)
                store["std" + suffix] = torch.empty((n, *std.shape[1:]), dtype=std.dtype)
            store["mean" + suffix][index] = mean.cpu()
            store["std" + suffix][index] = std.cpu()
    if not store:
        raise fail("--cache_latents: the training set is empty")
    return LatentCache(store["mean"], store["std"], store.get("mean_flip"), store.get("std_flip"), seed)


def check_cacheable(center_crop: bool) -> None:
    """Refuse to cache latents when the pixels change from epoch to epoch (random crops)."""
    if not center_crop:
        raise fail("--cache_latents cannot be combined with --random_crop: each epoch crops other pixels, "
                   "so a cached latent would stand for one crop only; drop one of the two flags")


class CaptionOnlyDataset(Dataset):
    """Wraps the training dataset: items {"caption", "index"} without loading images (their latents are cached)."""

    def __init__(self, base):
        self.base = base

    def use_epoch(self, epoch: int) -> None:
        """The caption draw of `epoch` (see ImageCaptionTrainDataset.use_epoch)."""
        self.base.use_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, k: int) -> dict:
        i, j = self.base.item_ref(k)
        return {"caption": self.base.groups[i]["captions"][j], "index": i}


def collate_captions(items) -> dict:
    """Batch of a CaptionOnlyDataset."""
    return {"caption": [it["caption"] for it in items], "index": torch.tensor([it["index"] for it in items])}
