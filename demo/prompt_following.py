"""Does a sample show what its prompt names? Judged per caption attribute by a classifier trained on real images.

The classifier is independent of the EDGE scorer on purpose: a scorer's opinion of generated images
is not a measure of their quality (DESIGN §8). It reads colour, shape kind, size, coarse position and
background of single-object images; each attribute is scored only on prompts that name exactly one
value of it (a caption template without a background leaves the background unscored).
"""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dataset.images import load_image
from dataset.procedural import POSITIONS, SIZES, caption_attributes, read_attributes, read_spec
from utils.common.seeding import seed_everything

# attribute -> (key in caption_attributes(), key in an object's / the image's attributes)
ATTRIBUTES = {"colour": "colours", "shape": "shapes", "size": "sizes", "position": "positions",
              "background": "backgrounds"}


def attribute_values(spec) -> dict:
    """The class names of every attribute for a procedural spec."""
    return {"colour": list(spec.colours), "shape": list(spec.shapes), "size": list(SIZES),
            "position": list(POSITIONS), "background": list(spec.backgrounds)}


class AttributeClassifier(nn.Module):
    """A small CNN with one linear head per attribute."""

    def __init__(self, num_classes: dict, width: int = 32):
        super().__init__()
        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
        # Position needs where, not only what: keep a coarse 4x4 map instead of a global average.
        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 2 * width),
                                      nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(2 * width * 16, n) for k, n in num_classes.items()})

    def forward(self, x) -> dict:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}


def to_tensor(images, resolution: int) -> torch.Tensor:
    """PIL images -> float tensor [N,3,R,R] in [-1,1], resized to the data set's resolution."""
    from dataset.torch_datasets import to_tensor as one

    return torch.stack([one(im.convert("RGB").resize((resolution, resolution))) for im in images]) * 2.0 - 1.0


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple:
    """95 % Wilson score interval (in %) of a share of k successes out of n; (nan, nan) when n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def share(correct) -> dict:
    """{"share", "lo", "hi", "k", "n"} (in %) of a boolean sequence, with its 95 % Wilson interval."""
    correct = np.asarray(correct, dtype=bool)
    k, n = int(correct.sum()), int(correct.size)
    lo, hi = wilson_interval(k, n)
    return {"share": 100.0 * k / n if n else float("nan"), "lo": lo, "hi": hi, "k": k, "n": n}


def single_object_labels(data_dir, split: str) -> tuple:
    """(image paths, {attribute: [value per image]}) of the split's single-object images."""
    attributes = read_attributes(data_dir)
    paths, labels = [], {k: [] for k in ATTRIBUTES}
    for rel, attr in sorted(attributes.items()):
        if f"/{split}/" in f"/{rel}" and len(attr["objects"]) == 1:
            paths.append(Path(data_dir) / rel)
            obj = attr["objects"][0]
            for k in ATTRIBUTES:
                labels[k].append(attr["background"] if k == "background" else obj[k])
    return paths, labels


def train_attribute_classifier(data_dir, epochs: int = 6, batch_size: int = 64, seed: int = 0,
                               max_images: int = 4000):
    """Train the classifier on real single-object training images; returns (model, spec)."""
    seed_everything(seed)
    spec, _ = read_spec(data_dir)
    values = attribute_values(spec)
    paths, labels = single_object_labels(data_dir, "train")
    paths = paths[:max_images]
    x = to_tensor([load_image(p) for p in paths], spec.resolution)
    y = {k: torch.tensor([values[k].index(v) for v in labels[k][:max_images]]) for k in ATTRIBUTES}
    model = AttributeClassifier({k: len(v) for k, v in values.items()})
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(epochs), desc="attribute classifier", leave=False):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            # No flips or crops: they would change the position label.
            xb = x[idx] + 0.03 * torch.randn(x[idx].shape, generator=gen)
            logits = model(xb)
            loss = sum(F.cross_entropy(logits[k], y[k][idx]) for k in ATTRIBUTES)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, spec


@torch.no_grad()
def predict(model, spec, images) -> dict:
    """{attribute: [predicted value per image]} for PIL images."""
    values = attribute_values(spec)
    x = to_tensor(images, spec.resolution)
    out = {k: [] for k in ATTRIBUTES}
    for i in range(0, len(x), 256):
        logits = model(x[i:i + 256])
        for k in ATTRIBUTES:
            out[k] += [values[k][j] for j in logits[k].argmax(1).tolist()]
    return out


def agreement(predicted: dict, named: dict, chance: dict = None) -> dict:
    """Per attribute, the share of items whose predicted value equals the value the prompt names.

    predicted: {attribute: [value per item]}; named: {attribute: [value or None per item]} (None: the
    prompt does not name it, the item is not scored for it). "all": items whose every named attribute
    is right. Each entry is a `share` dict, plus "chance" (in %) where `chance` gives class counts.
    """
    out, all_right, scored_any = {}, None, None
    for k, names in named.items():
        scored = np.array([v is not None for v in names], dtype=bool)
        right = np.array([p == v for p, v in zip(predicted[k], names)], dtype=bool)
        out[k] = share(right[scored])
        if chance and k in chance:
            out[k]["chance"] = 100.0 / chance[k]
        ok = right | ~scored
        all_right = ok if all_right is None else all_right & ok
        scored_any = scored if scored_any is None else scored_any | scored
    out["all"] = share(all_right[scored_any]) if named else share([])
    out["misread"] = misreadings(predicted, named)
    return out


def misreadings(predicted: dict, named: dict) -> dict:
    """{attribute: {"named -> read": count}} of the scored items read as another value, most frequent first."""
    out = {}
    for k, names in named.items():
        counts = {}
        for p, v in zip(predicted[k], names):
            if v is not None and p != v:
                counts[f"{v} -> {p}"] = counts.get(f"{v} -> {p}", 0) + 1
        if counts:
            out[k] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return out


def misread_lines(rows: dict, top: int = 3) -> list:
    """Markdown bullets: per row, its `top` most frequent misreadings over all attributes (rows with none: left out)."""
    lines = []
    for name, r in rows.items():
        pairs = [(n, f"{k} {m}") for k, c in (r.get("misread") or {}).items() for m, n in c.items()]
        pairs.sort(key=lambda x: -x[0])
        if pairs:
            lines.append(f"- {name}: " + ", ".join(f"{m} ({n})" for n, m in pairs[:top]))
    return lines


def prompt_following(model, spec, images, prompts) -> dict:
    """Agreement of the classifier's reading of `images` with what each prompt names, per attribute.

    Prompts that name more than one object (two colours or two shapes) are left out ("skipped").
    """
    keep, named = [], {k: [] for k in ATTRIBUTES}
    for i, p in enumerate(prompts):
        attr = caption_attributes(p, spec)
        if len(attr["colours"]) > 1 or len(attr["shapes"]) > 1 or not (attr["colours"] or attr["shapes"]):
            continue
        keep.append(i)
        for k, key in ATTRIBUTES.items():
            named[k].append(attr[key][0] if len(attr[key]) == 1 else None)
    predicted = predict(model, spec, [images[i] for i in keep]) if keep else {k: [] for k in ATTRIBUTES}
    result = agreement(predicted, named, {k: len(v) for k, v in attribute_values(spec).items()})
    result["skipped"] = len(prompts) - len(keep)
    return result


def format_share(entry: dict) -> str:
    """'97.0 [95.1, 98.2]' for a share dict (Markdown table cell)."""
    if not entry["n"]:
        return "–"
    return f"{entry['share']:.1f} [{entry['lo']:.1f}, {entry['hi']:.1f}]"


def markdown_table(rows: dict) -> str:
    """{row name: prompt_following result} -> one Markdown table: share [95 % CI] per attribute, n."""
    first = next(iter(rows.values()), None)
    keys = [k for k in list(ATTRIBUTES) + ["all"] if first is None or k in first]
    lines = ["| images | " + " | ".join(f"{k} %" for k in keys) + " | n |",
             "|---|" + "---|" * (len(keys) + 1)]
    if first is not None:
        lines.append("| chance | " + " | ".join(f"{first[k]['chance']:.1f}" if "chance" in first[k] else ""
                                                 for k in keys) + " | |")
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(format_share(r[k]) for k in keys) + f" | {r['all']['n']} |")
    return "\n".join(lines)
