"""Cheaper decodes of the denoised latent for the scorer (`--scorer_decode {full,reduced,tiny}`).

The scorer looks at its own input size (224 px for CLIP ViT-B/32), so decoding the x0 estimate at
the training resolution (512 px for SD) and resizing it down wastes most of the decoder's work,
which is the largest cost of an EDGE step.

  full     the model's VAE decoder at the latent's own size (exact; the default)
  reduced  resize the latent (bilinear, antialiased) so that its decode has the scorer's size, then
           decode with the model's VAE: an approximation (the latent of a downsized image is not a
           downsized latent), whose error `decode_error` measures
  tiny     a small distilled decoder (diffusers AutoencoderTiny, e.g. TAESD for SD 1.x) in place of
           the model's VAE decoder: an approximation of its output and of its gradients
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.common.errors import fail
from utils.method.vae_latents import vae_decode
from utils.models.loading import from_pretrained

SCORER_DECODE_MODES = ("full", "reduced", "tiny")


def vae_upsampling_factor(vae) -> int:
    """Pixels per latent cell of a diffusers VAE (8 for SD's AutoencoderKL, 2**(blocks-1) in general)."""
    if hasattr(vae.config, "decoder_block_out_channels"):  # AutoencoderTiny
        return int(vae.config.upsampling_scaling_factor) ** (len(vae.config.decoder_block_out_channels) - 1)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def reduced_latent_size(latent_hw, factor: int, scorer_hw) -> tuple:
    """Latent size whose decode covers the scorer's input: ceil(scorer / factor), never above the latent's own."""
    return tuple(min(int(n), math.ceil(int(s) / factor)) for n, s in zip(latent_hw, scorer_hw))


def resize_latents(latents: torch.Tensor, size) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of latents [B,C,H,W] to `size`; differentiable."""
    if tuple(latents.shape[-2:]) == tuple(size):
        return latents
    return F.interpolate(latents, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


class ScorerDecoder:
    """Callable: scaled latents -> pixels in about [-1, 1] for the scorer, with gradients to the latents."""

    def __init__(self, vae, mode: str = "full", scorer_size=(224, 224), tiny_vae=None):
        if mode not in SCORER_DECODE_MODES:
            raise fail(f"unknown --scorer_decode '{mode}' (choose from {', '.join(SCORER_DECODE_MODES)})")
        if mode == "tiny":
            if tiny_vae is None:
                raise fail("--scorer_decode tiny needs --tiny_vae <AutoencoderTiny folder> (e.g. a local TAESD copy)")
            if tiny_vae.config.latent_channels != vae.config.latent_channels:
                raise fail(f"--tiny_vae has {tiny_vae.config.latent_channels} latent channels, the model's VAE "
                           f"{vae.config.latent_channels}: it was made for another model")
        self.vae, self.mode, self.tiny_vae = vae, mode, tiny_vae
        self.scorer_size = tuple(scorer_size)
        self.factor = vae_upsampling_factor(vae)

    def latent_size(self, latent_hw) -> tuple:
        """The latent size that is decoded for a latent of size `latent_hw`."""
        if self.mode == "reduced":
            return reduced_latent_size(latent_hw, self.factor, self.scorer_size)
        return tuple(latent_hw)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if self.mode == "tiny":
            return vae_decode(self.tiny_vae, latents.to(self.tiny_vae.dtype))
        return vae_decode(self.vae, resize_latents(latents, self.latent_size(latents.shape[-2:])))


def load_tiny_vae(path, device="cpu", dtype=torch.float32):
    """A frozen diffusers AutoencoderTiny from a folder (e.g. a local copy of madebyollin/taesd)."""
    from diffusers import AutoencoderTiny

    if not Path(path).exists():
        raise fail(f"--tiny_vae folder not found: {path}")
    tiny = from_pretrained(AutoencoderTiny, path, "AutoencoderTiny of --tiny_vae", dtype=dtype)
    tiny.requires_grad_(False)
    return tiny.to(device=device).eval()


def check_decode_flags(mode: str, tiny_vae_path) -> None:
    """`--tiny_vae` goes with `--scorer_decode tiny` and only with it."""
    if mode == "tiny" and not tiny_vae_path:
        raise fail("--scorer_decode tiny needs --tiny_vae <AutoencoderTiny folder> (e.g. a local TAESD copy)")
    if tiny_vae_path and mode != "tiny":
        raise fail(f"--tiny_vae is only used with --scorer_decode tiny (got --scorer_decode {mode})")


def build_scorer_decoder(mode: str, vae, scorer_size, tiny_vae_path=None, device="cpu",
                         dtype=torch.float32) -> ScorerDecoder:
    """The decoder for `--scorer_decode` (loading `--tiny_vae` for mode tiny)."""
    check_decode_flags(mode, tiny_vae_path)
    tiny = load_tiny_vae(tiny_vae_path, device, dtype) if mode == "tiny" and tiny_vae_path else None
    return ScorerDecoder(vae, mode, scorer_size, tiny)


@torch.no_grad()
def decode_error(decoder: ScorerDecoder, latents: torch.Tensor, scorer=None) -> dict:
    """How far a cheap decode is from the full one, as the scorer sees it.

    Both decodes are resized to the scorer's input size (bicubic, antialiased, as the scorers do).
    Returns {"pixel_rmse": RMSE in [-1, 1] units, "pixel_rel": RMSE / RMS of the full decode and,
    with a scorer, "feature_cos": mean cosine between the scorer's image features of the two}.
    """
    full = ScorerDecoder(decoder.vae, "full", decoder.scorer_size)(latents).float()
    cheap = decoder(latents).float()

    def to_scorer(x):
        return F.interpolate(x, size=decoder.scorer_size, mode="bicubic", align_corners=False, antialias=True)

    a, b = to_scorer(full), to_scorer(cheap)
    rmse = (a - b).pow(2).mean().sqrt()
    out = {"pixel_rmse": float(rmse), "pixel_rel": float(rmse / a.pow(2).mean().sqrt().clamp_min(1e-12))}
    if scorer is not None:
        out["feature_cos"] = float((scorer.encode_image(full) * scorer.encode_image(cheap)).sum(-1).mean())
    return out
