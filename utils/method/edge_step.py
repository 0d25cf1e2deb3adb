"""The EDGE training step: one batch's noise-MSE, contrastive and diversity terms through the x0 estimate.

  z0 = vae.encode(x) * scaling_factor;  zt = add_noise(z0, eps, t), t ~ U{t_min..t_max}
  (with --edge_t_min/--edge_t_max the EDGE terms use a second draw t' ~ U{edge_t_min..edge_t_max} and forward;
   with --x0_unroll_steps K they use the x0 of a K-step DDIM chain from pure noise instead, as sampling makes it)
  pred = unet(zt, t, text_encoder(caption))                 (the noised latent, not z0)
  x0^ = predicted_x0(pred, zt, t);  img^ = vae.decode(x0^ / scaling_factor)   (with gradients)
  (with --scorer_shift s the scorer reads img^ translated by a random offset of up to s x its side)
  (with --edge_guidance_scale w != 1 the EDGE terms read the guided prediction uncond + w * (pred - uncond),
   uncond = unet(zt, t, text_encoder("")), as classifier-free guided sampling makes it; gradients flow through both,
   or with --edge_guidance_frozen_uncond through the conditional prediction only)
  L = lambda_C * contrastive(scorer(img^), scorer(caption)) + lambda_D * diversity(...) + lambda_mse * MSE
"""
from dataclasses import dataclass

import torch

from utils.method.denoise import diffusion_target, guided_unet_output, predicted_x0, unrolled_x0
from utils.method.losses import (contrastive_loss, diversity_loss, noise_mse_loss, retrieval_top1,
                                 same_caption_positives)
from utils.method.scorer_shift import random_shift
from utils.method.vae_latents import sample_cached_latents, vae_decode, vae_encode


@dataclass
class EDGELossConfig:
    """Weights and options of the training objective."""

    lambda_contrastive: float = 1.0
    lambda_diversity: float = 1.0
    lambda_mse: float = 0.0
    temperature: float = 0.1
    diversity_on: str = "image_text"
    x0_clamp: float = None
    t_min: int = 0
    t_max: int = 999
    edge_t_min: int = None  # EDGE terms on their own timestep range (second UNet forward); None: the MSE's draw
    edge_t_max: int = None
    x0_unroll_steps: int = 0  # >0: EDGE terms on a K-step DDIM chain from noise (denoise.unrolled_x0)
    same_caption_positives: bool = False  # identical captions in a batch are each other's matches
    scorer_shift: float = 0.0  # >0: the scorer reads each image at a random offset up to this share of the side
    edge_guidance_scale: float = 1.0  # !=1: EDGE terms on the classifier-free guided prediction (extra UNet forward)
    edge_guidance_frozen_uncond: bool = False  # the guided prediction's unconditional part carries no gradient

    @property
    def guided(self) -> bool:
        return self.uses_scorer and self.edge_guidance_scale != 1.0

    @property
    def separate_edge_timesteps(self) -> bool:
        return self.uses_scorer and (self.edge_t_min is not None or self.edge_t_max is not None)

    @property
    def uses_scorer(self) -> bool:
        return self.lambda_contrastive > 0 or self.lambda_diversity > 0


def edge_losses(unet, vae, noise_scheduler, scorer, pixel_values, captions, encoder_hidden_states,
                cfg: EDGELossConfig, generator: torch.Generator, weight_dtype=torch.float32, gatherer=None,
                decoder=None, latent_dist=None, keep=None, noise=None, timesteps=None,
                uncond_hidden_states=None) -> dict:
    """Forward one batch and return {"loss", and each active term, "top1_i2t", "top1_t2i"} (tensors).

    keep: boolean mask [B] of the items that enter the contrastive and diversity terms (None: all); items
    whose UNet caption was dropped (--caption_dropout) are left out, as the sample was not conditioned on
    the caption the scorer would compare it with. The MSE term covers every item.
    noise, timesteps: use these instead of drawing them from `generator` (tests: one global batch split
    over processes).
    uncond_hidden_states: the empty caption's text states ([1 or B, L, D]); needed when cfg.guided.

    decoder: scaled latents -> pixels for the scorer (utils.models.cheap_decode.ScorerDecoder; default: the full
    VAE decode). latent_dist: cached posterior (mean, std) of the batch (utils.stages.latent_cache) used in place
    of encoding `pixel_values` (then None); the sample is drawn as the encoder's would be.
    """
    if latent_dist is not None:
        device = latent_dist[0].device
        latents = sample_cached_latents(vae, latent_dist[0].to(weight_dtype), latent_dist[1].to(weight_dtype),
                                        generator).float()
    else:
        device = pixel_values.device
        with torch.no_grad():
            latents = vae_encode(vae, pixel_values.to(weight_dtype), generator).float()
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator)
    if timesteps is None:
        timesteps = torch.randint(cfg.t_min, cfg.t_max + 1, (latents.shape[0],), generator=generator)
    noise, timesteps = noise.to(device), timesteps.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    model_pred = unet(noisy, timesteps, encoder_hidden_states).sample
    out = {}
    loss = model_pred.new_zeros((), dtype=torch.float32)
    if cfg.lambda_mse > 0:
        out["mse"] = noise_mse_loss(model_pred, diffusion_target(noise_scheduler, latents, noise, timesteps))
        loss = loss + cfg.lambda_mse * out["mse"]
    if cfg.uses_scorer:
        uncond = None
        if cfg.guided:
            if uncond_hidden_states is None:
                raise ValueError("edge_guidance_scale != 1 needs uncond_hidden_states (the empty caption's states)")
            uncond = uncond_hidden_states.to(encoder_hidden_states).expand(encoder_hidden_states.shape[0], -1, -1)
        if cfg.x0_unroll_steps:
            x0 = unrolled_x0(unet, noise_scheduler, encoder_hidden_states, latents.shape, cfg.x0_unroll_steps,
                             generator, clamp=cfg.x0_clamp, uncond_hidden_states=uncond,
                             guidance_scale=cfg.edge_guidance_scale, frozen_uncond=cfg.edge_guidance_frozen_uncond)
        else:
            if cfg.separate_edge_timesteps:  # fresh noise at a timestep of the EDGE range, same latents and captions
                lo = cfg.t_min if cfg.edge_t_min is None else cfg.edge_t_min
                hi = cfg.t_max if cfg.edge_t_max is None else cfg.edge_t_max
                timesteps = torch.randint(lo, hi + 1, (latents.shape[0],), generator=generator).to(device)
                noisy = noise_scheduler.add_noise(latents, torch.randn(latents.shape, generator=generator).to(device),
                                                  timesteps)
                model_pred = unet(noisy, timesteps, encoder_hidden_states).sample
            model_pred = guided_unet_output(unet, model_pred, noisy, timesteps, uncond, cfg.edge_guidance_scale,
                                            cfg.edge_guidance_frozen_uncond)
            x0 = predicted_x0(noise_scheduler, model_pred.float(), noisy, timesteps, clamp=cfg.x0_clamp)
        images = (decoder or (lambda z: vae_decode(vae, z)))(x0.to(weight_dtype))
        u = scorer.encode_image(random_shift(images, cfg.scorer_shift, generator))
        v = scorer.encode_text(captions).to(u.device)
        if gatherer is not None:
            g = gatherer(u, v, keep)
            out["contrastive"], out["diversity"] = g["contrastive"], g["diversity"]
            all_u, all_v, positives = g["all_image"], g["all_text"], g.get("positives")
        else:
            if keep is not None:
                keep = torch.as_tensor(keep, dtype=torch.bool, device=u.device)
                u, v = u[keep], v[keep]
            positives = same_caption_positives(v) if cfg.same_caption_positives else None
            out["contrastive"] = contrastive_loss(u, v, cfg.temperature, positives=positives)
            out["diversity"] = diversity_loss(u, v, cfg.diversity_on)
            all_u, all_v = u, v
        loss = loss + cfg.lambda_contrastive * out["contrastive"] + cfg.lambda_diversity * out["diversity"]
        with torch.no_grad():
            out["top1_i2t"], out["top1_t2i"] = retrieval_top1(all_u, all_v, positives)
            out["scored_batch"] = torch.tensor(float(all_u.shape[0]))
    out["loss"] = loss
    return out
