"""Retrieval recalls as in BLIP's `itm_eval` (also used by MTT-VL and LoRS).

Tie rule: BLIP ranks with `np.argsort(score)[::-1]`; with a stable argsort, among equal scores the item
with the HIGHER index comes first. `rank_of` reproduces that order exactly (and deterministically, where
numpy's default quicksort is only stable for short rows).
"""
import numpy as np

RECALL_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")
ALL_KEYS = RECALL_KEYS + ("txt_r_mean", "img_r_mean", "r_mean")


def rank_of(scores: np.ndarray, targets) -> np.ndarray:
    """0-based ranks of the `targets` columns in the descending order of one score row (BLIP's tie rule)."""
    scores = np.asarray(scores)
    targets = np.asarray(targets, dtype=np.int64)
    t_scores = scores[targets][:, None]
    higher = (scores[None, :] > t_scores).sum(1)
    tied_after = ((scores[None, :] == t_scores) & (np.arange(scores.shape[0])[None, :] > targets[:, None])).sum(1)
    return higher + tied_after


def itm_recalls(scores_i2t, scores_t2i, img2txt, txt2img) -> dict:
    """Recall@1/5/10 in percent for image->text (txt_r*) and text->image (img_r*), and their means.

    scores_i2t: [N_img, N_txt]; scores_t2i: [N_txt, N_img]; img2txt[i]: caption indices of image i;
    txt2img[t]: image index of caption t. TR@K: an image is a hit when the best-ranked of ANY of its
    captions ranks < K. IR@K: per caption, its image ranks < K. r_mean is the mean of the six recalls.
    """
    scores_i2t = np.asarray(scores_i2t)  # kept in its dtype: a COCO float32 matrix is 0.5 GB already
    scores_t2i = np.asarray(scores_t2i)
    n_img, n_txt = scores_i2t.shape
    if scores_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i has shape {scores_t2i.shape}, expected {(n_txt, n_img)}")
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError("img2txt / txt2img lengths do not match the score matrices")
    if n_img == 0 or n_txt == 0:
        raise ValueError("empty score matrices")

    tr_ranks = np.empty(n_img)
    for i in range(n_img):
        caps = list(img2txt[i])
        if not caps:
            raise ValueError(f"image {i} has no captions")
        tr_ranks[i] = rank_of(scores_i2t[i], caps).min()
    ir_ranks = np.array([rank_of(scores_t2i[t], [txt2img[t]])[0] for t in range(n_txt)])

    out = {}
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100.0 * float((tr_ranks < k).mean())
        out[f"img_r{k}"] = 100.0 * float((ir_ranks < k).mean())
    out["txt_r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"]) / 3
    out["img_r_mean"] = (out["img_r1"] + out["img_r5"] + out["img_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def mean_std(values) -> tuple:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_std of no values")
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std
