"""SD's latent scaling: VAE latents <-> the scaled latents the UNet sees (`(z - shift) * scaling_factor`),
encode/decode through it, and samples from a cached posterior drawn as the encoder draws them."""
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


def sample_cached_latents(vae, mean: torch.Tensor, std: torch.Tensor, generator=None) -> torch.Tensor:
    """Scaled latents sampled from a cached posterior, drawn exactly as `vae_encode` draws them."""
    from diffusers.utils.torch_utils import randn_tensor

    eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return scale_latents(vae, mean + std * eps)


@torch.no_grad()
def posterior_mean_std(vae, pixels: torch.Tensor) -> tuple:
    """(mean, std) of the VAE posterior of [-1, 1] pixels (in the VAE's dtype)."""
    dist = vae.encode(pixels.to(dtype=vae.dtype, device=vae.device)).latent_dist
    return dist.mean, dist.std
