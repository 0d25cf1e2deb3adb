"""Random translations of the images the EDGE scorer reads (differentiable; `--scorer_shift`).

The contrastive and diversity gradients reach the generator through one frozen scorer, so they can move
pixels in ways only that scorer reads as a better match. Scoring each image at a random small offset (edge
pixels repeated) asks the generator for features the scorer finds wherever they sit, as differentiable
augmentation does for the networks of gradient-matching dataset distillation. Shifts only: colour, scale
and flips would change what the captions say.
"""
import torch
import torch.nn.functional as F


def random_shift(images: torch.Tensor, max_shift: float, generator: torch.Generator) -> torch.Tensor:
    """[B,C,H,W] -> the same, each image translated by up to `max_shift` x side pixels in y and x (replicate pad).

    Offsets are drawn from `generator` (CPU), one pair per image; max_shift 0 returns the input unchanged.
    """
    b, _, h, w = images.shape
    m = int(round(max_shift * max(h, w)))
    if m <= 0:
        return images
    padded = F.pad(images, (m, m, m, m), mode="replicate")
    offsets = torch.randint(0, 2 * m + 1, (b, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, oy:oy + h, ox:ox + w] for i, (oy, ox) in enumerate(offsets)])
