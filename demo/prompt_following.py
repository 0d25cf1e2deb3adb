"""Does a sample show the colour and shape its prompt names? Judged by a classifier trained on real images.

The classifier is independent of the EDGE scorer on purpose: a scorer's opinion of generated images
is not a measure of their quality (DESIGN §8). Only single-object images and prompts naming exactly
one colour and one shape are used, so the labels are unambiguous.
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dataset.images import load_image
from dataset.procedural import caption_attributes, read_attributes, read_spec
from utils.seeding import seed_everything


class AttributeClassifier(nn.Module):
    """A small CNN with one head for the colour and one for the shape kind."""

    def __init__(self, num_colours: int, num_shapes: int, width: int = 32):
        super().__init__()
        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 2 * width),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.colour = nn.Linear(2 * width, num_colours)
        self.shape = nn.Linear(2 * width, num_shapes)

    def forward(self, x):
        h = self.features(x)
        return self.colour(h), self.shape(h)


def to_tensor(images, resolution: int) -> torch.Tensor:
    """PIL images -> float tensor [N,3,R,R] in [-1,1], resized to the data set's resolution."""
    arrays = [np.asarray(im.convert("RGB").resize((resolution, resolution)), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def agreement(pred_colours, pred_shapes, prompt_colours, prompt_shapes) -> dict:
    """Share (in %) of items whose predicted colour / shape / both equal the prompt's."""
    c = np.asarray(pred_colours) == np.asarray(prompt_colours)
    s = np.asarray(pred_shapes) == np.asarray(prompt_shapes)
    n = len(c)
    if n == 0:
        return {"colour": float("nan"), "shape": float("nan"), "both": float("nan"), "n": 0}
    return {"colour": 100.0 * c.mean(), "shape": 100.0 * s.mean(), "both": 100.0 * (c & s).mean(), "n": n}


def single_object_labels(data_dir, split: str):
    """(image paths, colour names, shape names) of the split's single-object images."""
    attributes = read_attributes(data_dir)
    paths, colours, shapes = [], [], []
    for rel, attr in sorted(attributes.items()):
        if f"/{split}/" in f"/{rel}" and len(attr["objects"]) == 1:
            paths.append(Path(data_dir) / rel)
            colours.append(attr["objects"][0]["colour"])
            shapes.append(attr["objects"][0]["shape"])
    return paths, colours, shapes


def train_attribute_classifier(data_dir, epochs: int = 4, batch_size: int = 64, seed: int = 0,
                               max_images: int = 4000):
    """Train the classifier on real single-object training images; returns (model, spec)."""
    seed_everything(seed)
    spec, _ = read_spec(data_dir)
    paths, colours, shapes = single_object_labels(data_dir, "train")
    paths, colours, shapes = paths[:max_images], colours[:max_images], shapes[:max_images]
    x = to_tensor([load_image(p) for p in paths], spec.resolution)
    yc = torch.tensor([spec.colours.index(c) for c in colours])
    ys = torch.tensor([spec.shapes.index(s) for s in shapes])
    model = AttributeClassifier(len(spec.colours), len(spec.shapes))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(epochs), desc="attribute classifier", leave=False):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            xb = x[idx]
            if torch.rand(1, generator=gen).item() < 0.5:
                xb = xb.flip(3)
            lc, ls = model(xb)
            loss = F.cross_entropy(lc, yc[idx]) + F.cross_entropy(ls, ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, spec


@torch.no_grad()
def predict(model, spec, images) -> tuple:
    """Predicted (colour names, shape names) for PIL images."""
    x = to_tensor(images, spec.resolution)
    colours, shapes = [], []
    for i in range(0, len(x), 256):
        lc, ls = model(x[i:i + 256])
        colours += [spec.colours[j] for j in lc.argmax(1).tolist()]
        shapes += [spec.shapes[j] for j in ls.argmax(1).tolist()]
    return colours, shapes


def prompt_following(model, spec, images, prompts) -> dict:
    """Agreement of the classifier's reading of `images` with the colour and shape each prompt names.

    Prompts that do not name exactly one colour and one shape are left out (counted in "skipped").
    """
    keep = []
    for i, p in enumerate(prompts):
        attr = caption_attributes(p, spec)
        if len(attr["colours"]) == 1 and len(attr["shapes"]) == 1:
            keep.append((i, attr["colours"][0], attr["shapes"][0]))
    pc, ps = predict(model, spec, [images[i] for i, _, _ in keep]) if keep else ([], [])
    result = agreement(pc, ps, [c for _, c, _ in keep], [s for _, _, s in keep])
    result["skipped"] = len(prompts) - len(keep)
    return result
