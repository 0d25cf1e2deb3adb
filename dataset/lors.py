"""LoRS distilled sets: a torch `.pt` dict with synthetic images and text embeddings.

LoRS saves {"image": [N,3,H,W], "text": [N,D] (BERT CLS embeddings), "similarity_mat": [N,N],
"similarity_params", "syn_lr_img", "syn_lr_txt"}; everything beyond image and text is kept in `extras`.
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.common.errors import fail


@dataclass
class LorsSet:
    """Images [N,3,H,W] (as saved, i.e. normalised), text embeddings [N,D] and the other saved entries."""
    path: Path
    images: torch.Tensor
    text_embed: torch.Tensor
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.images.shape[0]


def read_lors_pt(path) -> LorsSet:
    """Load and validate a LoRS `.pt` distilled set."""
    path = Path(path)
    if not path.is_file():
        raise fail(f"LoRS distilled set not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise fail(f"could not load LoRS file {path}: {e}")
    if not isinstance(data, dict):
        raise fail(f"{path}: expected a dict with 'image' and 'text', found {type(data).__name__}")
    for key in ("image", "text"):
        if key not in data:
            raise fail(f"{path}: missing key {key!r} (found keys: {', '.join(map(str, data)) or 'none'})")
        if not isinstance(data[key], torch.Tensor):
            raise fail(f"{path}: {key!r} must be a tensor, found {type(data[key]).__name__}")
    images, text = data["image"], data["text"]
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise fail(f"{path}: 'image' must have shape [N,3,H,W], found {list(images.shape)}")
    if text.dim() != 2:
        raise fail(f"{path}: 'text' must have shape [N,D], found {list(text.shape)}")
    if images.shape[0] != text.shape[0]:
        raise fail(f"{path}: 'image' has {images.shape[0]} items but 'text' has {text.shape[0]}")
    if images.shape[0] == 0:
        raise fail(f"{path}: the set is empty")
    sim = data.get("similarity_mat")
    if isinstance(sim, torch.Tensor) and tuple(sim.shape) != (images.shape[0], images.shape[0]):
        raise fail(f"{path}: 'similarity_mat' must be [N,N] with N={images.shape[0]}, found {list(sim.shape)}")
    extras = {k: v for k, v in data.items() if k not in ("image", "text")}
    return LorsSet(path=path, images=images.float(), text_embed=text.float(), extras=extras)
