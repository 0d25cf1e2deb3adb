"""SD's latent scaling: VAE latents <-> the scaled latents the UNet sees (`(z - shift) * scaling_factor`)."""
import torch


def scale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> scaled latents (the UNet's space)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def unscale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> raw VAE latents (the decoder's input)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return latents / vae.config.scaling_factor + shift


def vae_encode(vae, pixels, generator=None) -> torch.Tensor:
    """Scaled latents of [-1, 1] pixels (a sample of the posterior, drawn with `generator`)."""
    return scale_latents(vae, vae.encode(pixels).latent_dist.sample(generator=generator))


def vae_decode(vae, latents) -> torch.Tensor:
    """Pixels in about [-1, 1] from scaled latents (differentiable)."""
    return vae.decode(unscale_latents(vae, latents)).sample
