"""EDGE training losses as pure functions: bi-directional contrastive, diversity, noise-prediction MSE.

Features passed in are L2-normalised here, so callers may pass raw scorer outputs.
The multi-process variant (`GatheredEDGELosses`) gathers features across processes with their
gradients; on one process it equals `contrastive_loss` / `diversity_loss`. Terms over an empty batch
(every caption dropped) are 0.
"""
import torch
import torch.nn.functional as F

DIVERSITY_MODES = ("image_text", "image_text_stacked", "image")


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, temperature: float = 0.1,
                     normalized: bool = False, positives: torch.Tensor = None) -> torch.Tensor:
    """Symmetric InfoNCE: (CE(S/tau, arange) + CE(S.T/tau, arange)) / 2 with S = u @ v.T of normalised features.

    normalized: the features are L2-normalised already (the retrieval model's): used as they are.
    positives: boolean [B, B] mask of the pairs that count as matches (the diagonal must be set; e.g.
    `same_caption_positives`); each row's (column's) loss is then -log of the softmax mass on its positives,
    so an image is not pushed away from another image's identical caption. None: the diagonal only.
    """
    if image_features.shape[0] == 0:
        return image_features.float().sum() * 0 + text_features.float().sum() * 0
    u, v = image_features.float(), text_features.float()
    if not normalized:
        u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    logits = u @ v.T / temperature
    if positives is not None:
        return (_multi_positive_nce(logits, positives) + _multi_positive_nce(logits.T, positives.T)) / 2
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _multi_positive_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log(sum of softmax(row) over the row's positives)."""
    pos = logits.masked_fill(~positives.bool(), float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(pos, dim=1)).mean()


def same_caption_positives(text_features: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """[B, B] mask of caption pairs with identical features (cosine >= 1 - tol): identical captions.

    Works on gathered features of all processes (no strings needed); the diagonal is always set.
    """
    v = F.normalize(text_features.detach().float(), dim=-1)
    mask = (v @ v.T) >= 1 - tol
    return mask | torch.eye(v.shape[0], dtype=torch.bool, device=v.device)


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


def retrieval_top1(image_features: torch.Tensor, text_features: torch.Tensor, positives: torch.Tensor = None) -> tuple:
    """In-batch top-1 accuracy image->text and text->image (the diagonal is the match, or any pair of the boolean
    [B, B] `positives`); 0 for an empty batch."""
    if image_features.shape[0] == 0:
        zero = image_features.new_zeros((), dtype=torch.float32)
        return zero, zero.clone()
    sim = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    n = sim.shape[0]
    if positives is None:
        positives = torch.eye(n, dtype=torch.bool, device=sim.device)
    rows = torch.arange(n, device=sim.device)
    i2t = positives[rows, sim.argmax(dim=1)].float().mean()
    t2i = positives[sim.argmax(dim=0), rows].float().mean()
    return i2t, t2i


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of all processes and returns this process's slice.

    Every process computes the same global loss from the gathered features, so each process's features
    receive the gradient of that loss once from every process: W times d(loss)/d(features). DDP then
    averages over the W processes, which leaves exactly the gradient of the global loss, on the same
    scale as a per-process mean term such as the MSE. (all_reduce works on gloo and NCCL alike.)
    """

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        ctx.rank, ctx.world, ctx.n = dist.get_rank(), dist.get_world_size(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of all processes (process order), differentiable: see `_GatherWithGrad`."""
    return _GatherWithGrad.apply(x)


def gather_mask(keep: torch.Tensor) -> torch.Tensor:
    """A per-row boolean mask of all processes (no gradient)."""
    import torch.distributed as dist

    k = keep.to(torch.uint8).contiguous()
    parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, k)
    return torch.cat(parts).bool()


class GatheredEDGELosses:
    """Contrastive + diversity losses over the features of all processes (more negatives).

    Features are gathered with their gradients (`gather_with_grad`): every process computes the
    global-batch loss, and after DDP's averaging the parameters get exactly its gradient, on the same
    scale as the per-process MSE term. (Gathering local rows only, open_clip's default
    gather_with_grad=False, would leave the EDGE terms' gradient W times too small.) On one process
    the terms equal `contrastive_loss` and `diversity_loss`.
    """

    def __init__(self, temperature: float, rank: int, world_size: int, diversity_mode: str = "image_text",
                 caption_positives: bool = False):
        self.temperature = temperature
        self.rank, self.world_size = rank, world_size
        self.diversity_mode = diversity_mode
        self.caption_positives = caption_positives

    def gather(self, image_features, text_features):
        """Global (image, text) normalised features, every row keeping its gradient path to its process."""
        u = F.normalize(image_features.float(), dim=-1)
        v = F.normalize(text_features.float(), dim=-1)
        if self.world_size == 1:
            return u, v
        return gather_with_grad(u), gather_with_grad(v)

    def __call__(self, image_features, text_features, keep=None) -> dict:
        """{"contrastive", "diversity", "all_image", "all_text", "positives"} over the global batch.

        keep: boolean mask of the local rows that enter the terms (None: all); the returned features are
        the kept rows of all processes.
        """
        all_u, all_v = self.gather(image_features, text_features)
        if keep is not None:
            all_keep = keep.bool() if self.world_size == 1 else gather_mask(keep.to(image_features.device))
            all_u, all_v = all_u[all_keep], all_v[all_keep]
        positives = same_caption_positives(all_v) if self.caption_positives else None
        con = contrastive_loss(all_u, all_v, self.temperature, positives=positives)
        div = diversity_loss(all_u, all_v, self.diversity_mode)
        return {"contrastive": con, "diversity": div, "all_image": all_u, "all_text": all_v, "positives": positives}
