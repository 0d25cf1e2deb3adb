"""Stable Diffusion components and pipelines, loaded from a hub id or folder with clear errors.

Loading goes through diffusers/transformers `from_pretrained`, so the same code reads
`stable-diffusion-v1-5/stable-diffusion-v1-5`, a local copy of it, a folder written by
`edge_diffusion_train.py`, or a tiny model made by `utils.models.tiny.build_tiny_sd` for tests and the demo.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.common.atomic_io import read_json
from utils.common.errors import fail

DEFAULT_SD = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion pipeline that training needs."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    model_index: dict


def _not_found(name_or_path, what: str, err: Exception = None) -> Exception:
    detail = f" ({type(err).__name__}: {str(err).splitlines()[0][:200]})" if err else ""
    return fail(
        f"could not load {what} from '{name_or_path}': looked for a local diffusers folder with model_index.json "
        f"and for a cached hub copy; download it once (e.g. `hf download {name_or_path} --local-dir <dir>`) "
        f"and pass the folder, or build a tiny test model with `python -m utils.models.tiny --output_dir <dir>`{detail}"
    )


def read_model_index(name_or_path) -> dict:
    """Read a pipeline's model_index.json from a folder or the local hub cache; clear error if absent."""
    path = Path(str(name_or_path))
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise fail(f"'{path}' is not a diffusers pipeline folder: model_index.json is missing "
                       f"(expected subfolders {', '.join(SD_COMPONENTS)})")
        return read_json(index)
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(str(name_or_path), "model_index.json")).read_text())
    except Exception as e:  # noqa: BLE001 - any hub/cache failure means "not available here"
        raise _not_found(name_or_path, "a Stable Diffusion pipeline", e)


def _class_from_index(model_index: dict, component: str, default_lib: str, default_cls: str):
    lib, cls = (model_index.get(component) or [default_lib, default_cls])[:2]
    if lib is None or cls is None:
        lib, cls = default_lib, default_cls
    module = __import__(lib, fromlist=[cls])
    return getattr(module, cls)


def load_sd_components(pretrained_model_name_or_path=DEFAULT_SD, revision=None, variant=None,
                       scheduler_cls=None) -> SDComponents:
    """Load UNet, VAE, text encoder, tokenizer and the training noise scheduler (DDPM by default)."""
    from diffusers import DDPMScheduler

    name = pretrained_model_name_or_path
    index = read_model_index(name)
    kw = dict(revision=revision)
    parts = {}
    for comp, lib, cls in [("unet", "diffusers", "UNet2DConditionModel"), ("vae", "diffusers", "AutoencoderKL"),
                           ("text_encoder", "transformers", "CLIPTextModel"),
                           ("tokenizer", "transformers", "CLIPTokenizer")]:
        klass = _class_from_index(index, comp, lib, cls)
        try:
            extra = {"variant": variant} if variant and comp != "tokenizer" else {}
            parts[comp] = klass.from_pretrained(name, subfolder=comp, **kw, **extra)
        except Exception as e:  # noqa: BLE001
            raise _not_found(name, f"the {comp} ({cls})", e)
    try:
        noise_scheduler = (scheduler_cls or DDPMScheduler).from_pretrained(name, subfolder="scheduler", **kw)
    except Exception as e:  # noqa: BLE001
        raise _not_found(name, "the scheduler", e)
    return SDComponents(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                        noise_scheduler, index)


def load_sd_pipeline(pretrained_model_name_or_path=DEFAULT_SD, torch_dtype=torch.float32, **kwargs):
    """Load a StableDiffusionPipeline (without safety checker) from a hub id or folder, with clear errors."""
    from diffusers import StableDiffusionPipeline

    read_model_index(pretrained_model_name_or_path)  # clear error before a long load
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            pretrained_model_name_or_path, dtype=torch_dtype, safety_checker=None,
            requires_safety_checker=False, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise _not_found(pretrained_model_name_or_path, "a StableDiffusionPipeline", e)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_prompts(text_encoder, tokenizer, prompts, device=None) -> torch.Tensor:
    """Token states used as UNet conditioning, tokenized exactly as the SD pipeline does."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    device = device or next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0]
