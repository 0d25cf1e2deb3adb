"""EDGE training losses as pure functions: bi-directional contrastive, diversity, noise-prediction MSE.

Features passed in are L2-normalised here, so callers may pass raw scorer outputs.
The multi-process variant of the contrastive loss is open_clip's `ClipLoss` (it gathers
features across processes); on one process it equals `contrastive_loss`.
"""
import torch
import torch.nn.functional as F

DIVERSITY_MODES = ("image_text", "image_text_stacked", "image")


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE: (CE(S/tau, arange) + CE(S.T/tau, arange)) / 2 with S = u @ v.T of normalised features."""
    u = F.normalize(image_features.float(), dim=-1)
    v = F.normalize(text_features.float(), dim=-1)
    logits = u @ v.T / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def mean_off_diagonal(sim: torch.Tensor) -> torch.Tensor:
    """Mean of the off-diagonal entries of a square matrix (0 for a 1x1 matrix)."""
    n = sim.shape[0]
    if n < 2:
        return sim.sum() * 0
    off = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=sim.device), 0)
    return off.sum() / (n * (n - 1))


def mean_off_pairs(sim: torch.Tensor) -> torch.Tensor:
    """Mean of a 2B x 2B similarity of stacked [images; captions] without the diagonal and the matched
    pairs (i, B + i) and (B + i, i) (0 when nothing is left, i.e. B = 1)."""
    n = sim.shape[0]
    b = n // 2
    idx = torch.arange(n, device=sim.device)
    excluded = (idx[:, None] == idx[None, :]) | ((idx[:, None] - idx[None, :]).abs() == b)
    count = n * n - int(excluded.sum())
    if count == 0:
        return sim.sum() * 0
    return sim.masked_fill(excluded, 0).sum() / count


def diversity_loss(image_features: torch.Tensor, text_features: torch.Tensor = None,
                   mode: str = "image_text") -> torch.Tensor:
    """Mean pairwise cosine similarity among samples (lower = more diverse), in [-1, 1].

    mode "image_text" (default; the public EDGE code): one joint vector per pair,
    W = normalize(cat([u, v], dim=-1)) (B x 2d), mean off-diagonal of W @ W.T (B x B).
    mode "image_text_stacked": W = cat([u, v], dim=0) (2B x d), i.e. images and captions as 2B
    separate points; the mean runs over all pairs of points except each point with itself and each
    image with its own caption (u_i . v_i is what the contrastive term raises, not a diversity term).
    mode "image": image features only.
    """
    u = F.normalize(image_features.float(), dim=-1)
    if mode == "image":
        w = u
    else:
        if text_features is None:
            raise ValueError(f"diversity mode '{mode}' needs text features")
        v = F.normalize(text_features.float(), dim=-1)
        if mode == "image_text":
            w = F.normalize(torch.cat([u, v], dim=-1), dim=-1)
        elif mode == "image_text_stacked":
            return mean_off_pairs(torch.cat([u, v], dim=0) @ torch.cat([u, v], dim=0).T)
        else:
            raise ValueError(f"unknown diversity mode '{mode}' (choose from {', '.join(DIVERSITY_MODES)})")
    return mean_off_diagonal(w @ w.T)


def noise_mse_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The plain diffusion loss: mean squared error between the UNet output and its target (noise or v)."""
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def retrieval_top1(image_features: torch.Tensor, text_features: torch.Tensor) -> tuple:
    """In-batch top-1 accuracy image->text and text->image (the diagonal is the match)."""
    sim = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    labels = torch.arange(sim.shape[0], device=sim.device)
    i2t = (sim.argmax(dim=1) == labels).float().mean()
    t2i = (sim.argmax(dim=0) == labels).float().mean()
    return i2t, t2i


class GatheredEDGELosses:
    """Contrastive + diversity losses over the features of all processes (more negatives).

    The contrastive term is open_clip's ClipLoss at logit scale 1/temperature; local features keep
    their gradient, the other processes' features enter as constants (open_clip's default), so
    DDP's gradient averaging recovers the gradient of the global-batch loss.
    """

    def __init__(self, temperature: float, rank: int, world_size: int, diversity_mode: str = "image_text"):
        from open_clip.loss import ClipLoss

        self.temperature = temperature
        self.rank, self.world_size = rank, world_size
        self.diversity_mode = diversity_mode
        self.clip_loss = ClipLoss(local_loss=False, gather_with_grad=False, rank=rank, world_size=world_size)

    def gather(self, image_features, text_features):
        """Global (image, text) normalised features, local rows keeping their gradient."""
        u = F.normalize(image_features.float(), dim=-1)
        v = F.normalize(text_features.float(), dim=-1)
        if self.world_size == 1:
            return u, v
        from open_clip.loss import gather_features

        return gather_features(u, v, local_loss=False, gather_with_grad=False, rank=self.rank,
                               world_size=self.world_size)

    def __call__(self, image_features, text_features) -> dict:
        """{"contrastive", "diversity", "all_image", "all_text"} over the global batch."""
        u = F.normalize(image_features.float(), dim=-1)
        v = F.normalize(text_features.float(), dim=-1)
        con = self.clip_loss(u, v, logit_scale=1.0 / self.temperature)
        all_u, all_v = self.gather(image_features, text_features)
        div = diversity_loss(all_u, all_v, self.diversity_mode)
        return {"contrastive": con, "diversity": div, "all_image": all_u, "all_text": all_v}
