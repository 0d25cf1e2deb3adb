"""Best-of-k sampling: draw k candidates per prompt and keep the one a retrieval scorer ranks highest.

Candidate 0 of image i starts from the same noise as plain sampling (`derive_seed(seed, i)`), so k = 1
is today's behaviour; candidate j > 0 starts from `derive_seed(derive_seed(seed, i), j)`. The choice
depends only on (seed, i, prompt, scorer), never on batching or the number of processes.
"""
import numpy as np
import torch

from utils.common.seeding import derive_seed


def candidate_seed(seed: int, index: int, candidate: int) -> int:
    """Noise seed of candidate `candidate` of image `index` (candidate 0: the plain sampling seed)."""
    base = derive_seed(seed, index)
    return base if candidate == 0 else derive_seed(base, candidate)


def pil_to_pixels(images) -> torch.Tensor:
    """[n, 3, H, W] float pixels in [-1, 1] of RGB PIL images."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


@torch.no_grad()
def candidate_scores(scorer, candidates, prompts) -> torch.Tensor:
    """[k, n] cosine similarity of candidate j of item i (`candidates[j][i]`, PIL) with `prompts[i]`."""
    text = scorer.encode_text(prompts)
    return torch.stack([(scorer.encode_image(pil_to_pixels(c)) * text).sum(-1).cpu() for c in candidates])


def pick_best(scores: torch.Tensor) -> list:
    """Per item, the candidate with the highest score (the lowest index on ties)."""
    return scores.argmax(0).tolist()
