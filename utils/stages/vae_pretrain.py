"""Train a (tiny) AutoencoderKL as an autoencoder on the training images, so a random-init VAE reconstructs.

Run by `python -m demo.pretrain_vae` for the offline demo: the loss is pixel MSE of the
reconstruction plus a small KL term; at the end the latent scaling factor is re-estimated
(1 / std of the latents) so the UNet sees unit-variance latents, and the pipeline is saved with the new VAE.
"""
import time
from pathlib import Path

import torch

from utils.common.atomic_io import append_jsonl, atomic_save_image
from utils.common.errors import fail
from utils.common.precision import resolve_precision


def vae_loss(vae, pixels, kl_weight: float, generator=None) -> dict:
    """{"loss", "recon", "kl"}: MSE(decode(sample), pixels) + kl_weight * mean KL to N(0, 1)."""
    dist = vae.encode(pixels).latent_dist
    recon_img = vae.decode(dist.sample(generator=generator)).sample
    recon = torch.nn.functional.mse_loss(recon_img.float(), pixels.float())
    kl = dist.kl().mean() / dist.mean[0].numel()
    return {"loss": recon + kl_weight * kl, "recon": recon, "kl": kl}


@torch.no_grad()
def estimate_scaling_factor(vae, loader, max_batches: int = 8) -> float:
    """1 / std of posterior samples over a few batches (the role of SD's 0.18215)."""
    samples = []
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        samples.append(vae.encode(batch["pixel_values"]).latent_dist.sample().flatten())
    std = torch.cat(samples).float().std().item()
    if not std > 0:
        raise fail("could not estimate the VAE scaling factor: latents have zero variance")
    return 1.0 / std


def pretrain_vae(args) -> Path:
    """Train the VAE of --pretrained_model_name_or_path for --max_train_steps and save the pipeline to --output_dir."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from utils.common.config import save_run_config
    from utils.common.seeding import set_cpu_threads
    from utils.models.sd_models import load_sd_components
    from utils.stages.train_data import EpochShuffleSampler, build_train_dataset, build_train_transform, collate
    from utils.stages.train_run import check_run_folder

    check_run_folder(args)
    accelerator = Accelerator(mixed_precision=resolve_precision(args.mixed_precision))
    if accelerator.num_processes > 1:
        raise fail("VAE pre-training runs on one process (launch without --multi_gpu)")
    if accelerator.device.type == "cpu":
        set_cpu_threads()
    set_seed(args.seed)
    comps = load_sd_components(args.pretrained_model_name_or_path)
    vae = comps.vae
    vae.requires_grad_(True)
    vae.train()
    dataset = build_train_dataset(args, build_train_transform(args.resolution, args.center_crop, args.random_flip),
                                  unit="images")  # captions play no part: an epoch is one pass over the images
    sampler = EpochShuffleSampler(len(dataset), args.seed)
    loader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=args.dataloader_num_workers, drop_last=False)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    vae, optimizer, loader = accelerator.prepare(vae, optimizer, loader)
    output_dir = Path(args.output_dir)
    log_path = output_dir / (args.logging_dir or "logs") / "train_log.jsonl"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(args, output_dir)
    max_steps = args.max_train_steps or args.num_train_epochs * len(loader)
    step, epoch, t0 = 0, 0, time.time()
    bar = tqdm(total=max_steps, desc="vae steps", disable=not accelerator.is_local_main_process)
    model = accelerator.unwrap_model(vae)
    while step < max_steps:
        sampler.use_epoch(epoch)
        dataset.use_epoch(epoch)
        for batch in loader:
            terms = vae_loss(model, batch["pixel_values"], args.vae_kl_weight)
            if not torch.isfinite(terms["loss"]):
                raise fail(f"VAE pre-training: non-finite loss at step {step + 1}; lower --learning_rate")
            accelerator.backward(terms["loss"])
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(vae.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            record = {"step": step, "epoch": epoch, **{k: float(v.detach()) for k, v in terms.items()},
                      "time": round(time.time() - t0, 3)}
            bar.set_postfix(recon=f"{record['recon']:.4f}")
            if accelerator.is_main_process:
                append_jsonl(log_path, record)
            if step >= max_steps:
                break
        epoch += 1
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        scaling = save_trained_vae(args, model, loader, output_dir, log_path)
        accelerator.print(f"VAE trained {step} steps, final recon MSE {record['recon']:.4f}, "
                          f"scaling factor {scaling:.4f}; pipeline saved to {output_dir}")
    accelerator.wait_for_everyone()
    return output_dir


def save_trained_vae(args, model, loader, output_dir: Path, log_path: Path) -> float:
    """Set the VAE's scaling factor, save the pipeline with it, a reconstruction grid and the loss curves."""
    from diffusers.utils import make_image_grid

    from utils.models.sd_models import load_sd_pipeline
    from utils.stages.train_plots import plot_loss_curves

    model.eval()
    scaling = estimate_scaling_factor(model, loader)
    model.register_to_config(scaling_factor=scaling)
    pipe = load_sd_pipeline(args.pretrained_model_name_or_path, vae=model)
    pipe.save_pretrained(output_dir)
    batch = next(iter(loader))
    with torch.no_grad():
        rec = model.decode(model.encode(batch["pixel_values"][:8]).latent_dist.mode()).sample
    originals = [_to_pil(x) for x in batch["pixel_values"][:8]]
    recons = [_to_pil(x) for x in rec]
    grid = make_image_grid(originals + recons, rows=2, cols=len(originals))
    atomic_save_image(output_dir / "logs" / "vae_reconstructions.png", grid)
    plot_loss_curves(log_path, log_path.parent / "loss_curves.png", title="VAE pre-training")
    return scaling


def _to_pil(x):
    from PIL import Image

    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)
