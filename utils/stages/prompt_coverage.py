"""Prompt choice by coverage: N prompts that spread over the train captions' text-feature space.

One caption is drawn per distinct train image (as for random choice), the captions are embedded by a
sentence encoder, clustered by k-means into N clusters (k-means++ start, fixed seed), and from each
cluster the caption nearest its centre is kept. Random choice over-samples the dense regions of the
caption distribution; this spends one image per region instead.
"""
import torch


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 25, chunk: int = 8192) -> tuple:
    """(centres [k, d], assignment [n]) of Lloyd's k-means on rows of `x`, k-means++ start from `seed`.

    An emptied cluster is restarted at the point farthest from its centre, so exactly k clusters remain.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    g = torch.Generator().manual_seed(int(seed))
    x = x.float()
    centres = x[torch.randint(n, (1,), generator=g)]
    d2 = _sq_dist(x, centres, chunk).squeeze(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        nxt = x[torch.multinomial(probs, 1, generator=g)]
        centres = torch.cat([centres, nxt])
        d2 = torch.minimum(d2, _sq_dist(x, nxt, chunk).squeeze(1))
    assign = None
    for _ in range(iters):
        dist = _sq_dist(x, centres, chunk)
        new_assign = dist.argmin(1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        for c in torch.nonzero(counts == 0).flatten().tolist():
            far = dist.gather(1, assign[:, None]).squeeze(1).argmax()
            sums[c], counts[c] = x[far], 1
            assign[far] = c
        centres = sums / counts[:, None].clamp(min=1)
    return centres, _sq_dist(x, centres, chunk).argmin(1)


def _sq_dist(x: torch.Tensor, c: torch.Tensor, chunk: int) -> torch.Tensor:
    """[n, m] squared Euclidean distances, in row chunks (memory stays flat for large n)."""
    return torch.cat([torch.cdist(x[s:s + chunk], c).pow(2) for s in range(0, x.shape[0], chunk)])


def coverage_choice(features: torch.Tensor, k: int, seed: int) -> list:
    """Indices of `k` distinct rows of `features`: per k-means cluster, the row nearest its centre (sorted)."""
    feats = torch.nn.functional.normalize(features.float(), dim=1)
    centres, assign = kmeans(feats, k, seed)
    chosen = []
    for c in range(k):
        members = torch.nonzero(assign == c).flatten()
        if len(members) == 0:  # only when rows coincide; fall back to the nearest row not yet taken
            order = torch.cdist(centres[c:c + 1], feats).squeeze(0).argsort().tolist()
            chosen.append(next(i for i in order if i not in chosen))
            continue
        d = (feats[members] - centres[c]).pow(2).sum(1)
        chosen.append(int(members[d.argmin()]))
    return sorted(set(chosen)) if len(set(chosen)) == k else _fill(chosen, feats, k)


def _fill(chosen: list, feats: torch.Tensor, k: int) -> list:
    """Deduplicate `chosen` and top it up with the rows farthest from those already chosen."""
    kept = list(dict.fromkeys(chosen))
    while len(kept) < k:
        d = torch.cdist(feats, feats[kept]).min(1).values
        d[kept] = -1
        kept.append(int(d.argmax()))
    return sorted(kept)


def caption_featurizer(name: str, batch_size: int = 256):
    """`captions -> [n, d]` features for coverage: a text encoder name (utils.models.encoders), or
    `scorer:<scorer spec>` for a scorer's text tower (e.g. scorer:retrieval:<folder>, whose trained head maps
    captions into the space the scorer ranks images in)."""
    if name.startswith("scorer:"):
        from utils.models.scorers import build_scorer

        scorer = build_scorer(name.split(":", 1)[1])
        return lambda captions: torch.cat([scorer.encode_text(captions[s:s + batch_size]).cpu()
                                           for s in range(0, len(captions), batch_size)])
    from utils.models.encoders import build_text_encoder

    encoder = build_text_encoder(name)
    return lambda captions: encoder.encode(captions, batch_size=batch_size)
