"""Frozen image-text scorers for the EDGE losses: open_clip, transformers CLIP, this project's retrieval model.

Every scorer takes generated pixels in [-1, 1] (the VAE decoder's range) and does its own
resize + normalisation inside the autograd graph, so gradients flow back to the UNet.
Text features are computed once per caption and cached (the text tower is frozen).

Specs for `build_scorer`:
  open_clip:ViT-B-32/openai        open_clip model name / pretrained tag or a local weights file
  open_clip:ViT-B-32               random init (tests only)
  hf_clip:<hub id or folder>       transformers CLIPModel (+ its tokenizer and image processor)
  retrieval:<folder>               a retrieval model saved by evaluation/ (image encoder + text head)
  <spec>+<spec>[+...]              an ensemble: the image-text similarity is the mean of the members' cosines
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN as OPENAI_CLIP_MEAN
from open_clip.constants import OPENAI_DATASET_STD as OPENAI_CLIP_STD

from utils.common.errors import fail


class Scorer:
    """Base: differentiable `encode_image(pixels in [-1, 1])`, cached `encode_text(captions)`; both L2-normalised."""

    image_size: tuple = (224, 224)
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD

    def __init__(self, device="cpu", dtype=torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self._text_cache = {}

    # -- to implement
    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, captions: list) -> torch.Tensor:
        raise NotImplementedError

    def modules(self) -> list:
        """The torch modules held (frozen and moved by `freeze_and_move`)."""
        raise NotImplementedError

    # -- shared
    def freeze_and_move(self):
        """Freeze every parameter, set eval mode and move to (device, dtype)."""
        for m in self.modules():
            m.requires_grad_(False)
            m.eval()
            m.to(device=self.device, dtype=self.dtype)
        return self

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """[-1, 1] pixels -> the scorer's input size and normalisation (differentiable)."""
        x = (pixels.float() + 1) / 2
        size = tuple(self.image_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised image features of [-1, 1] pixels, with gradients to the pixels."""
        return F.normalize(self._image_features(self.preprocess(pixels.to(self.device))).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, captions) -> torch.Tensor:
        """Normalised text features [len(captions), d]; each distinct caption is encoded once per run.

        A caption's features carry the rounding of the batch it first came in (other rows change the last bit),
        so a resumed training run, which meets captions with other batch-mates, differs from an uninterrupted
        one by ~1e-7. Encoding each caption alone would remove this at a cost in speed, not kept.
        """
        captions = list(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self._text_cache))
        if missing:
            feats = F.normalize(self._text_features(missing).float(), dim=-1)
            for c, f in zip(missing, feats):
                self._text_cache[c] = f.detach()
        return torch.stack([self._text_cache[c] for c in captions]).to(self.device)


def _features(out) -> torch.Tensor:
    """transformers 5 returns model outputs from get_*_features; older versions return tensors."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


class OpenClipScorer(Scorer):
    """An open_clip model (ViT-B/32 with OpenAI weights in the paper)."""

    def __init__(self, model_name: str, pretrained: str = None, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        import open_clip

        if model_name not in open_clip.list_models():
            raise fail(f"unknown open_clip model '{model_name}' (see open_clip.list_models())")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
        except Exception as e:  # noqa: BLE001 - offline / missing weights: one clear line
            raise fail(f"could not load open_clip weights '{pretrained}' for {model_name}: "
                       f"{str(e).splitlines()[0][:200]}; pass a local weights file "
                       f"(open_clip:{model_name}/<path.bin|.safetensors>) or pre-fill the hub cache")
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = model.visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", OPENAI_CLIP_MEAN))
        self.std = tuple(cfg.get("std", OPENAI_CLIP_STD))
        self.freeze_and_move()

    def modules(self):
        return [self.model]

    def _image_features(self, pixels):
        return self.model.encode_image(pixels)

    def _text_features(self, captions):
        return self.model.encode_text(self.tokenizer(captions).to(self.device))


class HFClipScorer(Scorer):
    """A transformers CLIPModel from a hub id or a folder (CLIPModel.from_pretrained)."""

    def __init__(self, name_or_path: str, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        from transformers import AutoTokenizer, CLIPModel

        from utils.models.loading import from_pretrained

        self.model = from_pretrained(CLIPModel, name_or_path, "transformers CLIP model")
        self.tokenizer = from_pretrained(AutoTokenizer, name_or_path, "transformers CLIP tokenizer")
        size = self.model.config.vision_config.image_size
        self.image_size = (size, size)
        try:
            from transformers import CLIPImageProcessor

            proc = CLIPImageProcessor.from_pretrained(name_or_path)
            self.mean, self.std = tuple(proc.image_mean), tuple(proc.image_std)
        except Exception:  # noqa: BLE001 - no preprocessor_config.json: CLIP's published statistics
            self.mean, self.std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        self.max_length = min(self.model.config.text_config.max_position_embeddings,
                              getattr(self.tokenizer, "model_max_length", 77) or 77)
        self.freeze_and_move()

    def modules(self):
        return [self.model]

    def _image_features(self, pixels):
        return _features(self.model.get_image_features(pixel_values=pixels))

    def _text_features(self, captions):
        tok = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        return _features(self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask))


class RetrievalScorer(Scorer):
    """This project's retrieval model (utils.models.retrieval_model): image encoder + text encoder/head."""

    def __init__(self, folder: str, device="cpu", dtype=torch.float32):
        super().__init__(device, torch.float32)  # small model: kept in fp32 whatever the run's weight dtype
        if not Path(folder).exists():
            raise fail(f"retrieval model folder not found: {folder}")
        from utils.models.retrieval_model import load_retrieval_model

        self.model, self.text_encoder, preprocess = load_retrieval_model(folder, device)
        self.image_size, self.mean, self.std = _size_mean_std(preprocess)
        self.freeze_and_move()

    def modules(self):
        return [m for m in (self.model, self.text_encoder) if isinstance(m, torch.nn.Module)]

    def freeze_and_move(self):
        for m in self.modules():
            m.requires_grad_(False)
            m.eval()
            m.to(device=self.device)
        return self

    def _image_features(self, pixels):
        return self.model.image_features(pixels)

    def _text_features(self, captions):
        return self.model.encode_captions(self.text_encoder, list(captions))


def _size_mean_std(preprocess: dict):
    """Input size, mean and std of a saved retrieval model's preprocessing dict."""
    size = preprocess.get("image_size", preprocess.get("size", 224))
    size = (size, size) if isinstance(size, int) else tuple(size)
    return size, tuple(preprocess.get("mean", OPENAI_CLIP_MEAN)), tuple(preprocess.get("std", OPENAI_CLIP_STD))


class EnsembleScorer(Scorer):
    """Several scorers as one: features are the members' normalised features side by side, scaled by 1/sqrt(K).

    The dot product of two such vectors is the mean of the members' cosine similarities, so every loss and
    metric written for one scorer (contrastive, diversity, in-batch top-1, ranking) reads the ensemble's mean
    similarity unchanged. Sample features that fit one member's idiosyncrasies move the mean by 1/K only.
    """

    def __init__(self, members: list):
        super().__init__(members[0].device, members[0].dtype)
        self.members = members
        self.image_size = max((tuple(m.image_size) for m in members), key=lambda s: s[0] * s[1])

    def modules(self):
        return [mod for m in self.members for mod in m.modules()]

    def freeze_and_move(self):
        for m in self.members:
            m.freeze_and_move()
        return self

    def _join(self, feats: list) -> torch.Tensor:
        return torch.cat([f.float() for f in feats], dim=-1) / len(feats) ** 0.5

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._join([m.encode_image(pixels) for m in self.members])

    @torch.no_grad()
    def encode_text(self, captions) -> torch.Tensor:
        captions = list(captions)
        return self._join([m.encode_text(captions).to(self.device) for m in self.members])


SCORER_KINDS = ("open_clip", "hf_clip", "retrieval")


def build_scorer(spec: str, device="cpu", dtype=torch.float32) -> Scorer:
    """Build a frozen scorer from a spec string (see the module docstring); '+' joins specs into an ensemble."""
    if "+" in str(spec):
        parts = [s.strip() for s in str(spec).split("+")]
        if any(not s for s in parts):
            raise fail(f"bad scorer spec '{spec}': an ensemble is <spec>+<spec>[+...] with no empty member")
        return EnsembleScorer([build_scorer(s, device, dtype) for s in parts])
    kind, sep, rest = str(spec).partition(":")
    if not sep or not rest or kind not in SCORER_KINDS:
        raise fail(f"bad scorer spec '{spec}': expected one of "
                   f"open_clip:<model>[/<pretrained tag or file>], hf_clip:<id or folder>, retrieval:<folder>")
    if kind == "open_clip":
        model_name, _, pretrained = rest.partition("/")
        if pretrained and ("/" in pretrained or "." in Path(pretrained).name) and not Path(pretrained).is_file():
            raise fail(f"open_clip weights file not found: {pretrained}")
        return OpenClipScorer(model_name, pretrained or None, device, dtype)
    if kind == "hf_clip":
        looks_local = rest.startswith((".", "/", "~")) or rest.count("/") > 1
        if looks_local and not Path(rest).expanduser().exists():
            raise fail(f"transformers CLIP folder not found: {rest}")
        return HFClipScorer(str(Path(rest).expanduser()) if looks_local else rest, device, dtype)
    return RetrievalScorer(rest, device, dtype)


