"""The protocol's retrieval model: a trainable image encoder and a projection head on frozen text features.

As in MTT-VL / LoRS: no image projection (the image encoder's pooled features are the embedding), a
text head `Linear(d_text, width) -> GELU -> Linear -> Dropout -> residual -> LayerNorm`, cosine
similarities at a fixed temperature, symmetric InfoNCE. `save_retrieval_model` / `load_retrieval_model`
let another stage use a trained model as a scorer (normalized image and caption features).
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.common.atomic_io import atomic_write_bytes, atomic_write_json, read_json
from utils.common.errors import fail
from utils.method.losses import contrastive_loss
from utils.models.encoders import build_image_encoder, build_text_encoder

CONFIG_NAME = "retrieval_config.json"
WEIGHTS_NAME = "retrieval_model.safetensors"


class ProjectionHead(nn.Module):
    """h = Linear1(x); out = LayerNorm(h + Dropout(Linear2(GELU(h))))."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x):
        h = self.projection(x)
        return self.layer_norm(h + self.dropout(self.fc(self.gelu(h))))


class RetrievalModel(nn.Module):
    """Image encoder (trained) + text projection head over cached frozen text features."""

    def __init__(self, image_encoder: nn.Module, text_dim: int, width: int, temperature: float = 0.07,
                 dropout: float = 0.1):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_projection = ProjectionHead(text_dim, width, dropout)
        self.temperature = float(temperature)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized features of pixel tensors already normalized with the encoder's mean/std."""
        return F.normalize(self.image_encoder(pixels).float(), dim=-1)

    def text_features(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Normalized features of frozen text-encoder embeddings [B, d_text]."""
        return F.normalize(self.text_projection(text_embeddings.float()).float(), dim=-1)

    def forward(self, pixels, text_embeddings):
        """Contrastive loss of an aligned batch."""
        return contrastive_loss(self.image_features(pixels), self.text_features(text_embeddings), self.temperature,
                                normalized=True)

    @torch.no_grad()
    def encode_captions(self, text_encoder, captions, batch_size: int = 256) -> torch.Tensor:
        """Normalized features of raw captions through the frozen `text_encoder` and the head."""
        device = next(self.text_projection.parameters()).device
        embeddings = text_encoder.encode(list(captions), batch_size=batch_size).to(device)
        return self.text_features(embeddings)


def normalize_pixels(pixels01: torch.Tensor, preprocess: dict) -> torch.Tensor:
    """Map pixels in [0, 1] ([B,3,H,W]) to the encoder's input space (mean/std of `preprocess`)."""
    mean = torch.tensor(preprocess["mean"], device=pixels01.device, dtype=pixels01.dtype).view(1, 3, 1, 1)
    std = torch.tensor(preprocess["std"], device=pixels01.device, dtype=pixels01.dtype).view(1, 3, 1, 1)
    return (pixels01 - mean) / std


def build_retrieval_model(image_encoder_name: str, text_dim: int, pretrained: bool = True,
                          temperature: float = 0.07, dropout: float = 0.1):
    """Build a fresh RetrievalModel -> (model, preprocess dict)."""
    encoder, preprocess, width = build_image_encoder(image_encoder_name, pretrained=pretrained)
    return RetrievalModel(encoder, text_dim, width, temperature, dropout), preprocess


def save_retrieval_model(model: RetrievalModel, folder, config: dict) -> Path:
    """Write the model's weights and `config` (image_encoder, text_encoder, text_dim, preprocess, ...)."""
    from safetensors.torch import save

    required = ("image_encoder", "text_encoder", "text_dim", "preprocess")
    missing = [k for k in required if k not in config]
    if missing:
        raise fail(f"save_retrieval_model: config lacks {', '.join(missing)}")
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS_NAME, save(state))
    atomic_write_json(folder / CONFIG_NAME, {**config, "temperature": model.temperature,
                                             "width": model.text_projection.projection.out_features})
    return folder


def load_retrieval_model(folder, device="cpu", text_encoder=None):
    """Load a saved retrieval model -> (model in eval mode, frozen text encoder, preprocess dict).

    The text encoder named in the config is loaded unless one is passed (it must have the same dim).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise fail(f"retrieval model folder {folder}: missing {p.name}")
    config = read_json(cfg_path)
    for key in ("image_encoder", "text_encoder", "text_dim", "preprocess"):
        if key not in config:
            raise fail(f"{cfg_path}: missing field {key!r}")
    model, _ = build_retrieval_model(config["image_encoder"], int(config["text_dim"]), pretrained=False,
                                     temperature=config.get("temperature", 0.07),
                                     dropout=config.get("dropout", 0.1))
    try:
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except RuntimeError as e:
        raise fail(f"{weights_path} does not match image encoder {config['image_encoder']!r}: "
                   f"{str(e).splitlines()[0]}")
    model.to(device).eval()
    if text_encoder is None:
        text_encoder = build_text_encoder(config["text_encoder"], device=device)
    if text_encoder.dim != int(config["text_dim"]):
        raise fail(f"{cfg_path}: text encoder {config['text_encoder']!r} has dim {text_encoder.dim}, "
                   f"the model expects {config['text_dim']}")
    return model, text_encoder, dict(config["preprocess"])
