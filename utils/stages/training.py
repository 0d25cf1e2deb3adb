"""Stage-1 training logic (EDGE fine-tuning of Stable Diffusion); `edge_diffusion_train.py` only parses flags.

One step, per batch of (image, caption):
  z0 = vae.encode(x) * scaling_factor;  zt = add_noise(z0, eps, t), t ~ U{t_min..t_max}
  pred = unet(zt, t, text_encoder(caption))                 (the noised latent, not z0)
  x0^ = predicted_x0(pred, zt, t);  img^ = vae.decode(x0^ / scaling_factor)   (with gradients)
  L = lambda_C * contrastive(scorer(img^), scorer(caption)) + lambda_D * diversity(...) + lambda_mse * MSE
Noise, timesteps and the VAE sample come from a generator seeded by (seed, micro-step, process), and
the data order from (seed, epoch), so a run resumed from a checkpoint repeats an uninterrupted run.
"""
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from utils.common.atomic_io import append_jsonl, atomic_write_bytes, atomic_write_text, read_jsonl
from utils.method.denoise import check_x0_estimable, diffusion_target, predicted_x0
from utils.common.errors import fail
from utils.common.precision import resolve_precision, weight_dtype as weight_dtype_of
from utils.method.losses import GatheredEDGELosses, contrastive_loss, diversity_loss, noise_mse_loss, retrieval_top1
from utils.common.seeding import derive_seed
from utils.method.vae_latents import vae_decode, vae_encode

LOG_NAME = "train_log.jsonl"
LOSS_TERMS = ("loss", "contrastive", "diversity", "mse", "top1_i2t", "top1_t2i", "recon", "kl")


class TrainingDiverged(RuntimeError):
    """A non-finite loss: training stopped, the last checkpoint is the last good state."""


# ---------------------------------------------------------------- data

class EpochShuffleSampler(Sampler):
    """A permutation of range(n) fixed by (seed, epoch); `use_epoch` selects the epoch.

    (Named `use_epoch`, not `set_epoch`, so accelerate's own iteration counter never overrides it.)
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


def build_train_transform(resolution: int, center_crop: bool = True, random_flip: bool = False):
    """PIL image -> tensor in [-1, 1] at resolution x resolution (resize shorter side, crop, optional flip)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
        transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])


def build_train_dataset(args, transform, unit: str = None):
    """The training set named by --dataset/--ann_root/--image_root, or a distilled set in --train_data_dir.

    unit: what one epoch passes over, "pairs" or "images" (default: --epoch_unit).
    """
    unit = unit or getattr(args, "epoch_unit", "pairs")
    from dataset.torch_datasets import ImageCaptionTrainDataset

    if args.train_data_dir:
        from dataset.distilled import read_distilled_set

        return ImageCaptionTrainDataset.from_distilled(read_distilled_set(args.train_data_dir), transform,
                                                       seed=args.seed, unit=unit)
    from dataset.karpathy import group_by_image
    from dataset.registry import load_split, resolve_split

    _, image_root = resolve_split(args.dataset, "train", args.ann_root, args.image_root)
    entries = load_split(args.dataset, "train", args.ann_root, args.image_root)
    groups = group_by_image(entries)
    if args.max_train_samples:
        groups = groups[: args.max_train_samples]
    return ImageCaptionTrainDataset(groups, image_root, transform, seed=args.seed, unit=unit)


def dataset_unit(dataset) -> str:
    """What one item of the training dataset (or its caption-only wrapper) is: "pairs" or "images"."""
    return getattr(getattr(dataset, "base", dataset), "unit", "images")


def total_train_steps(n_items: int, batch_size: int, num_epochs: int, num_processes: int = 1,
                      accumulation: int = 1, drop_last: bool = True) -> int:
    """Optimizer steps of `num_epochs` passes over `n_items` (pairs or images), as `train` counts them.

    drop_last: the contrastive term drops each epoch's incomplete batch (it needs full batches).
    """
    batches = n_items // batch_size if drop_last else math.ceil(n_items / batch_size)
    return num_epochs * math.ceil(math.ceil(batches / num_processes) / accumulation)


def collate(items) -> dict:
    """Stack pixels; keep captions as a list."""
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "caption": [it["caption"] for it in items],
            "index": torch.tensor([it["index"] for it in items])}


# ---------------------------------------------------------------- one step

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

    @property
    def uses_scorer(self) -> bool:
        return self.lambda_contrastive > 0 or self.lambda_diversity > 0


def edge_losses(unet, vae, noise_scheduler, scorer, pixel_values, captions, encoder_hidden_states,
                cfg: EDGELossConfig, generator: torch.Generator, weight_dtype=torch.float32, gatherer=None,
                decoder=None, latent_dist=None, keep=None, noise=None, timesteps=None) -> dict:
    """Forward one batch and return {"loss", and each active term, "top1_i2t", "top1_t2i"} (tensors).

    keep: boolean mask [B] of the items that enter the contrastive and diversity terms (None: all); items
    whose UNet caption was dropped (--caption_dropout) are left out, as the sample was not conditioned on
    the caption the scorer would compare it with. The MSE term covers every item.
    noise, timesteps: use these instead of drawing them from `generator` (tests: one global batch split
    over processes).

    decoder: scaled latents -> pixels for the scorer (utils.models.cheap_decode.ScorerDecoder; default: the full
    VAE decode). latent_dist: cached posterior (mean, std) of the batch (utils.stages.latent_cache) used in place
    of encoding `pixel_values` (then None); the sample is drawn as the encoder's would be.
    """
    if latent_dist is not None:
        from utils.stages.latent_cache import sample_cached_latents

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
        x0 = predicted_x0(noise_scheduler, model_pred.float(), noisy, timesteps, clamp=cfg.x0_clamp)
        images = (decoder or (lambda z: vae_decode(vae, z)))(x0.to(weight_dtype))
        u = scorer.encode_image(images)
        v = scorer.encode_text(captions).to(u.device)
        if gatherer is not None:
            g = gatherer(u, v, keep)
            out["contrastive"], out["diversity"] = g["contrastive"], g["diversity"]
            all_u, all_v = g["all_image"], g["all_text"]
        else:
            if keep is not None:
                keep = torch.as_tensor(keep, dtype=torch.bool, device=u.device)
                u, v = u[keep], v[keep]
            out["contrastive"] = contrastive_loss(u, v, cfg.temperature)
            out["diversity"] = diversity_loss(u, v, cfg.diversity_on)
            all_u, all_v = u, v
        loss = loss + cfg.lambda_contrastive * out["contrastive"] + cfg.lambda_diversity * out["diversity"]
        with torch.no_grad():
            out["top1_i2t"], out["top1_t2i"] = retrieval_top1(all_u, all_v)
            out["scored_batch"] = torch.tensor(float(all_u.shape[0]))
    out["loss"] = loss
    return out


# ---------------------------------------------------------------- checkpoints and logs

def list_checkpoints(output_dir) -> list:
    """checkpoint-N folders of a run, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    ckpts = [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
             and p.name.split("-", 1)[1].isdigit()]
    return sorted(ckpts, key=lambda p: int(p.name.split("-", 1)[1]))


def prune_checkpoints(output_dir, limit: int) -> list:
    """Remove the oldest checkpoints so that one more can be saved within `limit`; return removed paths."""
    if not limit:
        return []
    ckpts = list_checkpoints(output_dir)
    removed = ckpts[: max(0, len(ckpts) - limit + 1)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def resolve_resume(output_dir, resume_from_checkpoint):
    """The checkpoint folder to resume from, None to start fresh ("latest" with none saved yet)."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir() or not path.name.startswith("checkpoint-"):
        raise fail(f"--resume_from_checkpoint: no checkpoint folder '{resume_from_checkpoint}' "
                   f"(expected checkpoint-<step> in {output_dir} or a path to one)")
    return path


def trim_log(log_path, max_step: int) -> None:
    """Drop log records after `max_step` (written by the interrupted run after its last checkpoint)."""
    records = [r for r in read_jsonl(log_path) if r.get("step", 0) <= max_step]
    import json

    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in records))


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


# ---------------------------------------------------------------- validation

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


# ---------------------------------------------------------------- the loop

FINAL_MODEL_FILES = ("model_index.json", "pytorch_lora_weights.safetensors")


def has_final_model(output_dir) -> bool:
    """The run wrote its final pipeline (DiffFit/full) or LoRA weights."""
    return any((Path(output_dir) / name).is_file() for name in FINAL_MODEL_FILES)


def logged_steps(output_dir, logging_dir: str = "logs") -> int:
    """The last step recorded in the run's training log (0 without records)."""
    path = Path(output_dir) / (logging_dir or "logs") / LOG_NAME
    steps = [r["step"] for r in read_jsonl(path) if "step" in r] if path.is_file() else []
    return max(steps, default=0)


def holds_run(output_dir, logging_dir: str = "logs") -> bool:
    """A run's work is in the folder: checkpoints, a final model, or logged steps.

    A run_config.json alone (a start that failed before its first step) is not a run.
    """
    out = Path(output_dir)
    return bool(list_checkpoints(out)) or has_final_model(out) or logged_steps(out, logging_dir) > 0


def finished_run(output_dir, logging_dir: str, max_train_steps: int) -> bool:
    """The folder holds a run that logged `max_train_steps` steps (or more) and saved its final model."""
    return has_final_model(output_dir) and logged_steps(output_dir, logging_dir) >= max_train_steps


def check_output_dir(args) -> None:
    """Refuse to mix two runs in one output folder (resume or --overwrite_output_dir are explicit)."""
    out = Path(args.output_dir)
    if not out.exists():
        return
    if out.is_file():
        raise fail(f"--output_dir {out} is a file")
    holds = holds_run(out, getattr(args, "logging_dir", "logs"))
    if holds and not args.resume_from_checkpoint and not args.overwrite_output_dir:
        raise fail(f"--output_dir {out} already holds a run; pass --resume_from_checkpoint latest to continue it, "
                   f"--overwrite_output_dir to replace it, or choose another folder")
    if holds and args.overwrite_output_dir and not args.resume_from_checkpoint \
            and int(os.environ.get("RANK", "0")) == 0:  # runs before the Accelerator exists
        for p in list_checkpoints(out):
            shutil.rmtree(p, ignore_errors=True)
        (out / "logs" / LOG_NAME).unlink(missing_ok=True)


def _forced_cpu() -> bool:
    """True when accelerate is told to use the CPU even where CUDA exists (ACCELERATE_USE_CPU)."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def _flat_config(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}


def train(args) -> Path:
    """Run stage 1 as configured by the parsed flags; return the output folder."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from utils.common.config import save_run_config
    from utils.models.scorers import build_scorer
    from utils.models.sd_models import encode_prompts, load_sd_components
    from utils.common.seeding import set_cpu_threads
    from utils.method.trainable_params import configure_trainable, count_parameters

    check_output_dir(args)
    output_dir = Path(args.output_dir)
    logging_dir = output_dir / (args.logging_dir or "logs")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=resolve_precision(args.mixed_precision, cpu=_forced_cpu()),
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)))
    if accelerator.device.type == "cpu":
        set_cpu_threads()
    set_seed(args.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg = EDGELossConfig(args.lambda_contrastive, args.lambda_diversity, args.lambda_mse, args.temperature,
                         args.diversity_on, args.x0_clamp)
    global_batch = args.train_batch_size * (world if args.gather_features else 1)
    if cfg.lambda_contrastive > 0 and global_batch < 2:
        raise fail(f"the contrastive loss needs at least 2 captions per batch for negatives; got "
                   f"--train_batch_size {args.train_batch_size}"
                   + (f" x {world} processes" if args.gather_features else " (per process, --gather_features off)"))

    comps = load_sd_components(args.pretrained_model_name_or_path)
    unet, vae, text_encoder, tokenizer, noise_scheduler = (comps.unet, comps.vae, comps.text_encoder,
                                                           comps.tokenizer, comps.noise_scheduler)
    n_train_t = noise_scheduler.config.num_train_timesteps
    cfg.t_min = args.t_min
    cfg.t_max = n_train_t - 1 if args.t_max is None else args.t_max
    if not 0 <= cfg.t_min <= cfg.t_max < n_train_t:
        raise fail(f"need 0 <= --t_min <= --t_max < {n_train_t}, got {cfg.t_min}..{cfg.t_max}")
    if cfg.uses_scorer:
        check_x0_estimable(noise_scheduler, cfg.t_min, cfg.t_max)
    weight_dtype = weight_dtype_of(accelerator.mixed_precision)
    scorer = build_scorer(args.scorer, accelerator.device, weight_dtype) if cfg.uses_scorer else None
    gatherer = (GatheredEDGELosses(cfg.temperature, rank, world, cfg.diversity_on)
                if cfg.uses_scorer and args.gather_features and world > 1 else None)
    scorer_decoder = None
    if cfg.uses_scorer and (getattr(args, "scorer_decode", "full") != "full" or getattr(args, "tiny_vae", None)):
        from utils.models.cheap_decode import build_scorer_decoder

        scorer_decoder = build_scorer_decoder(args.scorer_decode, vae, scorer.image_size, args.tiny_vae,
                                              accelerator.device, weight_dtype)

    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    vae.to(accelerator.device, dtype=weight_dtype).eval()
    text_encoder.to(accelerator.device, dtype=weight_dtype).eval()
    params = configure_trainable(unet, args.trainable, args.lora_rank)
    if args.trainable == "lora":
        # diffusers' LoRA recipe: frozen base in the weight dtype, adapters in fp32.
        unet.to(accelerator.device, dtype=weight_dtype)
        for p in params:
            p.data = p.data.float()
    else:
        unet.to(accelerator.device)
    counts = count_parameters(unet)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.uses_scorer:  # the decode of the x0 estimate runs with gradients: its activations are the largest
            vae.enable_gradient_checkpointing()
            if scorer_decoder is not None and scorer_decoder.tiny_vae is not None:
                scorer_decoder.tiny_vae.enable_gradient_checkpointing()
    if getattr(args, "channels_last", False):
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if getattr(args, "compile", False):
        unet.compile()  # in place: the module keeps its class, state dict and checkpoint hooks
        if cfg.uses_scorer:
            vae.decoder.compile()
    ema_unet = None
    if args.use_ema:
        if args.trainable == "lora":
            raise fail("--use_ema is not supported with --trainable lora")
        from diffusers import UNet2DConditionModel
        from diffusers.training_utils import EMAModel

        ema_unet = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=UNet2DConditionModel,
                            model_config=unet.config)
        ema_unet.to(accelerator.device)

    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=args.learning_rate, momentum=args.sgd_momentum,
                                    weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                      weight_decay=args.weight_decay, eps=args.adam_epsilon)

    cache_latents = getattr(args, "cache_latents", False)
    dataset = build_train_dataset(args, build_train_transform(args.resolution, args.center_crop,
                                                              args.random_flip and not cache_latents))
    latent_cache = None
    if cache_latents:
        from utils.stages.latent_cache import CaptionOnlyDataset, build_latent_cache, check_cacheable

        check_cacheable(args.center_crop)
        accelerator.print(f"caching the VAE latents of {dataset.num_images} images"
                          + (" and of their mirrors (--random_flip)" if args.random_flip else ""))
        latent_cache = build_latent_cache(vae, dataset.with_unit("images"), args.train_batch_size, args.random_flip, args.seed,
                                          progress=accelerator.is_local_main_process)
        dataset = CaptionOnlyDataset(dataset)
    drop_last = cfg.lambda_contrastive > 0
    if drop_last and len(dataset) < args.train_batch_size * world:
        raise fail(f"the training set has {len(dataset)} {dataset_unit(dataset)}, fewer than one batch of "
                   f"{args.train_batch_size} x {world} processes")
    sampler = EpochShuffleSampler(len(dataset), args.seed)
    from utils.stages.latent_cache import collate_captions

    loader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                        collate_fn=collate_captions if latent_cache is not None else collate,
                        num_workers=args.dataloader_num_workers, drop_last=drop_last)
    steps_per_epoch = math.ceil(math.ceil(len(loader) / world) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * world,
                                 num_training_steps=max_train_steps * world)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    if ema_unet is not None:
        accelerator.register_for_checkpointing(ema_unet)
    _register_hooks(accelerator, args.trainable)

    if args.resume_from_checkpoint == "latest" and finished_run(output_dir, args.logging_dir, max_train_steps):
        accelerator.print(f"{output_dir} already finished its {max_train_steps} steps; nothing to do "
                          f"(raise --max_train_steps to train on)")
        accelerator.end_training()
        return output_dir
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(args, output_dir)
        accelerator.init_trackers("edge_train", config=_flat_config(args)) if args.report_to != "none" else None
    log_path = logging_dir / LOG_NAME

    global_step, first_epoch, skip_batches = 0, 0, 0
    resume = resolve_resume(output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume is None:
        accelerator.print(f"no checkpoint in {output_dir}: starting a new run")
    if resume is not None:
        accelerator.print(f"resuming from {resume}")
        accelerator.load_state(str(resume))
        global_step = int(resume.name.split("-", 1)[1])
        first_epoch = global_step // steps_per_epoch
        skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
        if accelerator.is_main_process:
            trim_log(log_path, global_step)
        if global_step >= max_train_steps:  # the last checkpoint is the end: write the final model, train nothing
            num_epochs = first_epoch

    accelerator.print(f"training {counts['trainable']:,} of {counts['total']:,} UNet parameters ({args.trainable}); "
                      f"{len(dataset)} {dataset_unit(dataset)} per epoch, {max_train_steps} steps, batch {args.train_batch_size} x {world} "
                      f"processes x {args.gradient_accumulation_steps} accumulation")
    bar = tqdm(range(max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    unwrapped = accelerator.unwrap_model(unet)
    window, window_n, t_start = {}, 0, time.time()
    last_ckpt = resume
    unet.train()
    for epoch in range(first_epoch, num_epochs):
        sampler.use_epoch(epoch)
        dataset.use_epoch(epoch)
        epoch_loader = loader
        if epoch == first_epoch and skip_batches:
            epoch_loader = accelerator.skip_first_batches(loader, skip_batches)
        for i, batch in enumerate(epoch_loader):
            micro = epoch * len(loader) + i + (skip_batches if epoch == first_epoch else 0)
            gen = torch.Generator().manual_seed(derive_seed(args.seed, micro * world + rank))
            with accelerator.accumulate(unet):
                captions = batch["caption"]
                dropped = [bool(args.caption_dropout) and torch.rand((), generator=gen).item() < args.caption_dropout
                           for _ in captions]
                cond_captions = ["" if d else c for c, d in zip(captions, dropped)]
                keep = None  # with gathered features every process passes a mask (the gather is collective)
                if args.caption_dropout and (gatherer is not None or any(dropped)):
                    keep = torch.tensor([not d for d in dropped], device=accelerator.device)
                with torch.no_grad():
                    hidden = encode_prompts(text_encoder, tokenizer, cond_captions, accelerator.device)
                latent_dist = (latent_cache.lookup(batch["index"], epoch, accelerator.device)
                               if latent_cache is not None else None)
                terms = edge_losses(unet, vae, noise_scheduler, scorer, batch.get("pixel_values"), captions, hidden,
                                    cfg, gen, weight_dtype, gatherer, decoder=scorer_decoder, latent_dist=latent_dist,
                                    keep=keep)
                loss = terms["loss"]
                bad = accelerator.reduce(torch.tensor([0.0 if torch.isfinite(loss) else 1.0],
                                                      device=accelerator.device), reduction="sum")
                if bad.item() > 0:
                    accelerator.end_training()
                    raise TrainingDiverged(
                        f"non-finite loss at step {global_step + 1} (epoch {epoch}); training stopped, nothing after "
                        f"{'the last good checkpoint ' + str(last_ckpt) if last_ckpt else 'the start (no checkpoint)'} "
                        f"was saved; lower --learning_rate, set --x0_clamp or --max_grad_norm, or use fp32/bf16")
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in terms.items():
                window[k] = window.get(k, 0.0) + float(v.detach())
            window_n += 1
            if not accelerator.sync_gradients:
                continue
            if ema_unet is not None:
                ema_unet.step(unwrapped.parameters())
            global_step += 1
            bar.update(1)
            means = torch.tensor([window[k] / window_n for k in sorted(window)], device=accelerator.device)
            means = accelerator.reduce(means, reduction="mean")
            record = {"step": global_step, "epoch": epoch, "lr": lr_scheduler.get_last_lr()[0],
                      **{k: float(v) for k, v in zip(sorted(window), means)}, "time": round(time.time() - t_start, 3)}
            window, window_n = {}, 0
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if accelerator.is_main_process:
                append_jsonl(log_path, record)
            accelerator.log({k: v for k, v in record.items() if k not in ("step", "epoch")}, step=global_step)
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                last_ckpt = save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if (args.validation_prompts and args.validation_steps and global_step % args.validation_steps == 0
                    and global_step < max_train_steps):
                _validate(accelerator, args, unwrapped, ema_unet, vae, text_encoder, tokenizer, noise_scheduler,
                          global_step, output_dir)
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break
    bar.close()
    accelerator.wait_for_everyone()
    if args.validation_prompts:
        _validate(accelerator, args, unwrapped, ema_unet, vae, text_encoder, tokenizer, noise_scheduler,
                  global_step, output_dir)
    if accelerator.is_main_process:
        save_final_model(args, unwrapped, ema_unet, output_dir)
        if log_path.exists() and read_jsonl(log_path):
            plot_loss_curves(log_path, logging_dir / "loss_curves.png", title=f"{output_dir.name}: training terms")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


def save_checkpoint(accelerator, output_dir, global_step: int, total_limit=None) -> Path:
    """accelerator.save_state into output_dir/checkpoint-<step>, keeping at most `total_limit` checkpoints."""
    path = Path(output_dir) / f"checkpoint-{global_step}"
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    return path


def _register_hooks(accelerator, trainable: str) -> None:
    """Checkpoints hold a normal `unet/` folder (DiffFit/full) or LoRA weights beside accelerate's state."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    def is_unet(m):
        return isinstance(accelerator.unwrap_model(m), UNet2DConditionModel)

    def save_hook(models, weights, out_dir):
        for i in reversed(range(len(models))):
            if not is_unet(models[i]):
                continue
            model = accelerator.unwrap_model(models[i])
            if accelerator.is_main_process:
                if trainable == "lora":
                    from utils.method.trainable_params import lora_state_dict

                    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=lora_state_dict(model),
                                                              safe_serialization=True)
                else:
                    model.save_pretrained(os.path.join(out_dir, "unet"))
            if trainable != "lora" and weights:
                weights.pop(i)  # saved as unet/ above; accelerate need not write it again

    def load_hook(models, in_dir):
        if trainable == "lora":
            return  # accelerate's own model file holds base + adapter weights
        for i in reversed(range(len(models))):
            if not is_unet(models[i]):
                continue
            model = models.pop(i)
            loaded = UNet2DConditionModel.from_pretrained(in_dir, subfolder="unet")
            accelerator.unwrap_model(model).load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_final_model(args, unet, ema_unet, output_dir) -> Path:
    """Write the trained pipeline (DiffFit/full) or the LoRA weights (with the base named in run_config.json)."""
    from diffusers import StableDiffusionPipeline

    from utils.models.sd_models import load_sd_pipeline

    if args.trainable == "lora":
        from utils.method.trainable_params import lora_state_dict

        StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=lora_state_dict(unet),
                                                  safe_serialization=True)
        return Path(output_dir)
    if ema_unet is not None:
        ema_unet.store(unet.parameters())
        ema_unet.copy_to(unet.parameters())
    pipe = load_sd_pipeline(args.pretrained_model_name_or_path, unet=unet)
    pipe.save_pretrained(output_dir)
    if ema_unet is not None:
        ema_unet.restore(unet.parameters())
    return Path(output_dir)


def _validate(accelerator, args, unet, ema_unet, vae, text_encoder, tokenizer, noise_scheduler, step, output_dir):
    """Main process: render the validation prompts to validation/step-<N>.png (and TensorBoard)."""
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
