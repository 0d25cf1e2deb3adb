"""What a training run shows while it runs: loss curves from the step log and validation image grids."""
from pathlib import Path

import torch

from utils.common.atomic_io import atomic_write_bytes, read_jsonl
from utils.common.errors import fail
from utils.common.seeding import derive_seed

LOSS_TERMS = ("loss", "contrastive", "diversity", "mse", "top1_i2t", "top1_t2i", "recon", "kl")


def moving_average(values, window: int) -> list:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curves(log_path, png_path, title: str = "training") -> Path:
    """One panel per logged term (loss, contrastive, diversity, mse, in-batch top-1) from the JSONL log."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(log_path)
    by_step = {r["step"]: r for r in records if "step" in r}
    steps = sorted(by_step)
    terms = [t for t in LOSS_TERMS if any(t in by_step[s] for s in steps)]
    if not terms:
        raise fail(f"{log_path}: no logged training terms to plot")
    fig, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 2.8), squeeze=False)
    for ax, term in zip(axes[0], terms):
        xs = [s for s in steps if term in by_step[s]]
        ys = [by_step[s][term] for s in xs]
        ax.plot(xs, ys, lw=0.8, alpha=0.35, color="C0")
        window = max(1, len(ys) // 15)
        if window > 1:  # a trailing moving average makes the trend readable through batch noise
            ax.plot(xs, moving_average(ys, window), lw=1.6, color="C0", label=f"mean of {window}")
            ax.legend(fontsize=7)
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())
    return Path(png_path)


def render_validation(unet, vae, text_encoder, tokenizer, noise_scheduler, prompts, resolution: int, seed: int,
                      num_inference_steps: int = 25, guidance_scale: float = 7.5, device=None):
    """Render one image per prompt with the current weights -> a PIL image grid (one row)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import make_image_grid

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(noise_scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = []
    was_training = unet.training
    unet.eval()
    try:
        for i, prompt in enumerate(prompts):
            g = torch.Generator(device="cpu").manual_seed(derive_seed(seed, i))
            with torch.no_grad():
                images.append(pipe(prompt, height=resolution, width=resolution, num_inference_steps=num_inference_steps,
                                   guidance_scale=guidance_scale, generator=g).images[0])
    finally:
        unet.train(was_training)
    return make_image_grid(images, rows=1, cols=len(images))


def validate(accelerator, args, unet, ema_unet, vae, text_encoder, tokenizer, noise_scheduler, step, output_dir):
    """Main process: render the validation prompts to validation/step-<N>.png (and TensorBoard); returns the grid.

    Other processes return None.
    """
    grid = None
    if accelerator.is_main_process:
        import numpy as np

        from utils.common.atomic_io import atomic_save_image

        if ema_unet is not None:
            ema_unet.store(unet.parameters())
            ema_unet.copy_to(unet.parameters())
        with torch.autocast(accelerator.device.type, enabled=accelerator.mixed_precision != "no"):
            grid = render_validation(unet, vae, text_encoder, tokenizer, noise_scheduler, args.validation_prompts,
                                     args.resolution, args.seed, args.validation_inference_steps,
                                     args.validation_guidance_scale, accelerator.device)
        if ema_unet is not None:
            ema_unet.restore(unet.parameters())
        atomic_save_image(Path(output_dir) / "validation" / f"step-{step:06d}.png", grid)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
    accelerator.wait_for_everyone()
    return grid
