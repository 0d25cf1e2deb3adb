"""The denoised-latent estimate x0 from a UNet output, for epsilon-, v- and sample-prediction schedulers.

Formulas (abar = scheduler.alphas_cumprod[t]), the same as DDPMScheduler.step's pred_original_sample:
  epsilon:       x0 = (z_t - sqrt(1 - abar) * eps) / sqrt(abar)
  v_prediction:  x0 = sqrt(abar) * z_t - sqrt(1 - abar) * v
  sample:        x0 = model output
"""
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _abar(scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    abar = scheduler.alphas_cumprod.to(device=like.device)[timesteps.to(like.device).long()].float()
    return abar.view(-1, *([1] * (like.ndim - 1)))


def check_x0_estimable(scheduler, t_min: int, t_max: int, prediction_type: str = None) -> None:
    """Refuse an epsilon-prediction x0 estimate at a timestep where abar is 0 (it divides by sqrt(abar)).

    That is the last timestep of a scheduler with rescale_betas_zero_snr=True; v- and sample-prediction
    estimates stay finite there.
    """
    from utils.common.errors import fail

    ptype = prediction_type or scheduler.config.prediction_type
    if ptype != "epsilon":
        return
    abar = scheduler.alphas_cumprod[t_min:t_max + 1]
    zero = (abar <= 0).nonzero().flatten()
    if len(zero):
        t = t_min + int(zero[0])
        raise fail(f"--pretrained_model_name_or_path: its scheduler predicts epsilon with "
                   f"rescale_betas_zero_snr={scheduler.config.get('rescale_betas_zero_snr', False)}, so alpha_bar is 0 "
                   f"at timestep {t} and the x0 estimate of the EDGE terms divides by zero; use a v_prediction model "
                   f"or pass --t_max {t - 1}")


def predicted_x0(scheduler, model_output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor,
                 prediction_type: str = None, clamp: float = None) -> torch.Tensor:
    """Differentiable x0 estimate (in the dtype of `model_output`); optional clamp to [-clamp, clamp]."""
    ptype = prediction_type or scheduler.config.prediction_type
    out, z = model_output.float(), noisy.float()
    abar = _abar(scheduler, timesteps, z)
    if ptype == "epsilon":
        x0 = (z - (1 - abar).sqrt() * out) / abar.sqrt()
    elif ptype == "v_prediction":
        x0 = abar.sqrt() * z - (1 - abar).sqrt() * out
    elif ptype == "sample":
        x0 = out
    else:
        raise ValueError(f"unknown prediction type '{ptype}' (choose from {', '.join(PREDICTION_TYPES)})")
    if clamp is not None:
        x0 = x0.clamp(-clamp, clamp)
    return x0.to(model_output.dtype)


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     prediction_type: str = None) -> torch.Tensor:
    """The regression target of the plain diffusion loss for the scheduler's prediction type."""
    ptype = prediction_type or scheduler.config.prediction_type
    if ptype == "epsilon":
        return noise
    if ptype == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if ptype == "sample":
        return latents
    raise ValueError(f"unknown prediction type '{ptype}' (choose from {', '.join(PREDICTION_TYPES)})")


def guided_output(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance as the SD pipeline applies it: uncond + w * (cond - uncond) (w = 1: cond)."""
    return uncond + guidance_scale * (cond - uncond)


def guided_unet_output(unet, cond_output: torch.Tensor, z: torch.Tensor, timesteps: torch.Tensor,
                       uncond_hidden_states: torch.Tensor = None, guidance_scale: float = 1.0,
                       frozen_uncond: bool = False) -> torch.Tensor:
    """`cond_output` (the UNet's output for `z` at `timesteps` under the caption) with classifier-free guidance:
    one more forward on `uncond_hidden_states` (without gradient when `frozen_uncond`); unchanged when those
    states are None or the scale is 1."""
    if uncond_hidden_states is None or guidance_scale == 1.0:
        return cond_output
    with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_uncond):
        uncond_output = unet(z, timesteps, uncond_hidden_states).sample
    return guided_output(cond_output, uncond_output, guidance_scale)


def unrolled_x0(unet, scheduler, encoder_hidden_states: torch.Tensor, shape, steps: int, generator: torch.Generator,
                clamp: float = None, uncond_hidden_states: torch.Tensor = None,
                guidance_scale: float = 1.0, frozen_uncond: bool = False) -> torch.Tensor:
    """x0 estimate at the last step of a `steps`-step DDIM chain from pure noise, differentiable through every step.

    The chain runs as sampling does (trailing timestep spacing), conditioned on `encoder_hidden_states`, with
    classifier-free guidance when `uncond_hidden_states` is given and guidance_scale != 1 (`frozen_uncond`: its
    unconditional predictions carry no gradient); the returned latent is the last step's x0 estimate (what
    sampling decodes).
    """
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    ddim.set_timesteps(steps)
    device, dtype = encoder_hidden_states.device, encoder_hidden_states.dtype
    z = (torch.randn(tuple(shape), generator=generator) * ddim.init_noise_sigma).to(device, dtype)
    for i, t in enumerate(ddim.timesteps):
        ts = t.to(device).expand(z.shape[0])
        out = guided_unet_output(unet, unet(z, ts, encoder_hidden_states).sample, z, ts, uncond_hidden_states,
                                 guidance_scale, frozen_uncond)
        if i == len(ddim.timesteps) - 1:
            return predicted_x0(scheduler, out.float(), z, ts, clamp=clamp)
        z = ddim.step(out, t, z).prev_sample
