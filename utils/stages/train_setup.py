"""Setting up a training run: the Accelerator, the objective, the models on their device, the data, the optimizer.

Each builder reads the parsed flags; `prepare_models` is also what benchmarks/train_step.py times steps with.
"""
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from utils.common.errors import fail
from utils.common.precision import resolve_precision
from utils.method.denoise import check_x0_estimable
from utils.method.edge_step import EDGELossConfig
from utils.stages.train_data import (EpochShuffleSampler, build_train_dataset, build_train_transform, collate,
                                     dataset_unit)


@dataclass
class TrainModels:
    """The models of a run on their device: frozen VAE/text encoder/scorer, the UNet with its trainable set."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    scorer: object
    decoder: object
    params: list
    counts: dict


@dataclass
class TrainData:
    """The training set, its epoch-seeded sampler, the loader and (with --cache_latents) the latent cache."""

    dataset: object
    sampler: EpochShuffleSampler
    loader: DataLoader
    latent_cache: object


def _forced_cpu() -> bool:
    """True when accelerate is told to use the CPU even where CUDA exists (ACCELERATE_USE_CPU)."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def build_accelerator(args, output_dir: Path, logging_dir: Path):
    """The Accelerator (precision resolved first), CPU threads and the global seed."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    from utils.common.seeding import set_cpu_threads

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=resolve_precision(args.mixed_precision, cpu=_forced_cpu()),
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)))
    if accelerator.device.type == "cpu":
        set_cpu_threads()
    set_seed(args.seed)
    return accelerator


def loss_config(args, world: int) -> EDGELossConfig:
    """The objective's weights from the flags; refuses a contrastive term without negatives."""
    cfg = EDGELossConfig(args.lambda_contrastive, args.lambda_diversity, args.lambda_mse, args.temperature,
                         args.diversity_on, args.x0_clamp)
    global_batch = args.train_batch_size * (world if args.gather_features else 1)
    if cfg.lambda_contrastive > 0 and global_batch < 2:
        raise fail(f"the contrastive loss needs at least 2 captions per batch for negatives; got "
                   f"--train_batch_size {args.train_batch_size}"
                   + (f" x {world} processes" if args.gather_features else " (per process, --gather_features off)"))
    cfg.same_caption_positives = bool(getattr(args, "same_caption_positives", False))
    cfg.scorer_shift = float(getattr(args, "scorer_shift", 0.0) or 0.0)
    if not 0 <= cfg.scorer_shift < 0.5:
        raise fail(f"--scorer_shift is a share of the image side in [0, 0.5), got {cfg.scorer_shift}")
    cfg.edge_guidance_scale = float(getattr(args, "edge_guidance_scale", 1.0))
    if cfg.edge_guidance_scale < 1:
        raise fail(f"--edge_guidance_scale is a classifier-free guidance scale >= 1, got {cfg.edge_guidance_scale}")
    cfg.edge_guidance_frozen_uncond = bool(getattr(args, "edge_guidance_frozen_uncond", False))
    if cfg.edge_guidance_frozen_uncond and not cfg.guided:
        raise fail("--edge_guidance_frozen_uncond needs --edge_guidance_scale other than 1 (and the EDGE terms on)")
    if getattr(args, "hard_negative_batches", False) and not cfg.uses_scorer:
        raise fail("--hard_negative_batches clusters by the EDGE scorer: it needs --lambda_contrastive or "
                   "--lambda_diversity > 0")
    return cfg


def prepare_models(args, cfg: EDGELossConfig, device, weight_dtype) -> TrainModels:
    """Load SD, the scorer and the scorer's decoder; freeze, choose the trainable set, apply the memory options.

    Also fills cfg.t_min/t_max from --t_min/--t_max and the scheduler (refusing an x0 estimate it cannot give).
    Used by `utils.stages.training` and by benchmarks/train_step.py.
    """
    from utils.method.trainable_params import configure_trainable, count_parameters
    from utils.models.scorers import build_scorer
    from utils.models.sd_models import load_sd_components

    comps = load_sd_components(args.pretrained_model_name_or_path)
    unet, vae, text_encoder = comps.unet, comps.vae, comps.text_encoder
    n_train_t = comps.noise_scheduler.config.num_train_timesteps
    cfg.t_min = args.t_min
    cfg.t_max = n_train_t - 1 if args.t_max is None else args.t_max
    if not 0 <= cfg.t_min <= cfg.t_max < n_train_t:
        raise fail(f"need 0 <= --t_min <= --t_max < {n_train_t}, got {cfg.t_min}..{cfg.t_max}")
    cfg.edge_t_min, cfg.edge_t_max = getattr(args, "edge_t_min", None), getattr(args, "edge_t_max", None)
    lo = cfg.t_min if cfg.edge_t_min is None else cfg.edge_t_min
    hi = cfg.t_max if cfg.edge_t_max is None else cfg.edge_t_max
    if cfg.separate_edge_timesteps and not 0 <= lo <= hi < n_train_t:
        raise fail(f"need 0 <= --edge_t_min <= --edge_t_max < {n_train_t}, got {lo}..{hi}")
    cfg.x0_unroll_steps = getattr(args, "x0_unroll_steps", 0) or 0
    if not 0 <= cfg.x0_unroll_steps <= n_train_t:
        raise fail(f"--x0_unroll_steps must be between 0 and {n_train_t}, got {cfg.x0_unroll_steps}")
    if cfg.x0_unroll_steps and cfg.separate_edge_timesteps:
        raise fail("--x0_unroll_steps starts the EDGE terms' chain from pure noise; it does not take --edge_t_min/max")
    if cfg.uses_scorer:
        check_x0_estimable(comps.noise_scheduler, min(cfg.t_min, lo), max(cfg.t_max, hi))
    scorer = build_scorer(args.scorer, device, weight_dtype) if cfg.uses_scorer else None
    decoder = None
    if cfg.uses_scorer and (getattr(args, "scorer_decode", "full") != "full" or getattr(args, "tiny_vae", None)):
        from utils.models.cheap_decode import build_scorer_decoder

        decoder = build_scorer_decoder(args.scorer_decode, vae, scorer.image_size, args.tiny_vae, device,
                                       weight_dtype)
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False)
        frozen.to(device, dtype=weight_dtype).eval()
    params = configure_trainable(unet, args.trainable, args.lora_rank)
    if args.trainable == "lora":
        from diffusers.training_utils import cast_training_params

        # diffusers' LoRA recipe: frozen base in the weight dtype, adapters in fp32.
        unet.to(device, dtype=weight_dtype)
        cast_training_params(unet, dtype=torch.float32)
    else:
        unet.to(device)
    counts = count_parameters(unet)
    _memory_options(args, cfg, unet, vae, decoder)
    return TrainModels(unet, vae, text_encoder, comps.tokenizer, comps.noise_scheduler, scorer, decoder, params,
                       counts)


def _memory_options(args, cfg, unet, vae, decoder) -> None:
    """--gradient_checkpointing, --channels_last, --compile."""
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.uses_scorer:  # the decode of the x0 estimate runs with gradients: its activations are the largest
            vae.enable_gradient_checkpointing()
            if decoder is not None and decoder.tiny_vae is not None:
                decoder.tiny_vae.enable_gradient_checkpointing()
    if getattr(args, "channels_last", False):
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if getattr(args, "compile", False):
        unet.compile()  # in place: the module keeps its class, state dict and checkpoint hooks
        if cfg.uses_scorer:
            vae.decoder.compile()


def build_ema(args, unet, device):
    """diffusers' EMAModel of the UNet weights with --use_ema, else None."""
    if not args.use_ema:
        return None
    if args.trainable == "lora":
        raise fail("--use_ema is not supported with --trainable lora")
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    ema_unet = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=UNet2DConditionModel,
                        model_config=unet.config)
    ema_unet.to(device)
    return ema_unet


def build_optimizer(args, params):
    """SGD (the paper's) or AdamW over the trainable parameters."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.learning_rate, momentum=args.sgd_momentum,
                               weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             weight_decay=args.weight_decay, eps=args.adam_epsilon)


def build_train_data(args, vae, cfg: EDGELossConfig, accelerator, scorer=None) -> TrainData:
    """The training set (or, with --cache_latents, its captions and the cached VAE posteriors) and its loader.

    With --hard_negative_batches the batches are cut from clusters of the scorer's caption features.
    """
    from utils.stages.latent_cache import collate_captions

    world = accelerator.num_processes
    cache_latents = getattr(args, "cache_latents", False)
    dataset = build_train_dataset(args, build_train_transform(args.resolution, args.center_crop,
                                                              args.random_flip and not cache_latents))
    latent_cache = None
    if cache_latents:
        from utils.stages.latent_cache import CaptionOnlyDataset, build_latent_cache, check_cacheable

        check_cacheable(args.center_crop)
        accelerator.print(f"caching the VAE latents of {dataset.num_images} images"
                          + (" and of their mirrors (--random_flip)" if args.random_flip else ""))
        latent_cache = build_latent_cache(vae, dataset.with_unit("images"), args.train_batch_size, args.random_flip,
                                          args.seed, progress=accelerator.is_local_main_process)
        dataset = CaptionOnlyDataset(dataset)
    drop_last = cfg.lambda_contrastive > 0
    if drop_last and len(dataset) < args.train_batch_size * world:
        raise fail(f"the training set has {len(dataset)} {dataset_unit(dataset)}, fewer than one batch of "
                   f"{args.train_batch_size} x {world} processes")
    hard = getattr(args, "hard_negative_batches", False)
    sampler = (_hard_negative_sampler(args, dataset, scorer, accelerator) if hard
               else EpochShuffleSampler(len(dataset), args.seed))
    loader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                        collate_fn=collate_captions if latent_cache is not None else collate,
                        num_workers=args.dataloader_num_workers, drop_last=drop_last)
    return TrainData(dataset, sampler, loader, latent_cache)


def _hard_negative_sampler(args, dataset, scorer, accelerator):
    """HardNegativeSampler over the training images, clustered by the EDGE scorer's caption features."""
    from utils.stages.hard_negatives import HardNegativeSampler, image_text_features

    base = getattr(dataset, "base", dataset)
    features = image_text_features(base.groups, scorer.encode_text, progress=accelerator.is_local_main_process)
    item_image = [base.item_ref(k)[0] for k in range(len(base))]
    return HardNegativeSampler(features, item_image, args.train_batch_size, args.seed)
