"""Prompt following without attribute labels: does a retrieval model rank a sample's own prompt first?

For data sets with no attribute labels (any Karpathy-format set), the demo reports the share of images
whose own prompt an independently trained retrieval model ranks first among the prompts of a block of
`block` images (100 by default), for samples and for real images. The model must not be the EDGE scorer
(the demo uses another seed's full-set model), or EDGE would be judged by the judge it trained against.
"""
import numpy as np
import torch

from demo.prompt_following import share, to_tensor


def own_prompt_top1(similarity: torch.Tensor) -> np.ndarray:
    """Boolean per row of a square image x prompt similarity block: is the row's own prompt (diagonal) ranked first?

    Ties count as not first (a model that scores every prompt alike must not look perfect).
    """
    diag = similarity.diagonal()
    others = similarity.clone()
    others.fill_diagonal_(float("-inf"))
    return (diag > others.max(dim=1).values).cpu().numpy()


@torch.no_grad()
def prompt_rank_share(scorer, images, prompts, resolution: int, block: int = 100) -> dict:
    """`share` of images whose own prompt `scorer` ranks first among the prompts of its block of `block` items.

    Blocks are consecutive; a last block smaller than `block` (or than 2) is left out, so every counted
    image competes with the same number of prompts.
    """
    hits = []
    for start in range(0, len(images) - block + 1, block):
        x = to_tensor(images[start:start + block], resolution)
        u = torch.cat([scorer.encode_image(x[i:i + 64]) for i in range(0, len(x), 64)])
        v = scorer.encode_text(prompts[start:start + block])
        hits.append(own_prompt_top1(u @ v.T))
    result = share(np.concatenate(hits) if hits else [])
    result["chance"] = 100.0 / block
    return result


def real_test_items(dataset: str, ann_root, image_root=None, n: int = 300, keep=None) -> tuple:
    """(PIL images, prompts) of the first `n` test images of any registered data set, each with its first caption.

    keep: optional predicate on a test entry (e.g. single-object images only); others are skipped.
    """
    from pathlib import Path

    from dataset.images import load_image
    from dataset.registry import read_split

    entries, _, root = read_split(dataset, "test", ann_root, image_root, check_images=False)
    entries = [e for e in entries if keep is None or keep(e)][:n]
    return [load_image(Path(root) / e["image"]) for e in entries], \
        [e["caption"][0] if isinstance(e["caption"], list) else e["caption"] for e in entries]


def measure_prompt_rank(scorer_spec: str, sets: dict, real: tuple = None, block: int = 100) -> dict:
    """{row name: prompt_rank_share} for real (images, prompts) and each distilled set folder of `sets`."""
    return measure_prompt_ranks({"rank": scorer_spec}, sets, real, block)["rank"]


def measure_prompt_ranks(scorer_specs: dict, sets: dict, real: tuple = None, block: int = 100) -> dict:
    """{key: measure_prompt_rank(spec)} for each key -> scorer spec of `scorer_specs`, every set's images read once."""
    from pathlib import Path

    from dataset.distilled import read_distilled_set
    from dataset.images import load_image
    from utils.models.scorers import build_scorer

    items = {}
    if real:
        items["real test images"] = real
    for name, folder in sets.items():
        ds = read_distilled_set(folder)
        items[name] = ([load_image(Path(folder) / r["image"]) for r in ds.records],
                       [r["captions"][0] for r in ds.records])
    out = {}
    for key, spec in scorer_specs.items():
        scorer = build_scorer(spec)
        size = int(scorer.image_size[0])
        out[key] = {name: prompt_rank_share(scorer, images, prompts, size, block)
                    for name, (images, prompts) in items.items()}
    return out
