"""Stage-1 training (EDGE fine-tuning of Stable Diffusion); `edge_diffusion_train.py` only parses flags.

Read top to bottom: `train` = `setup_training` (accelerator, models, data, optimizer, accelerate's prepare)
-> `resume_position` -> `run_steps` (the step loop; one step's math is `utils.method.edge_step.edge_losses`)
-> `finish` (last validation grid, final model, loss curves). Noise, timesteps and the VAE sample come from a
generator seeded by (seed, micro-step, process), and the data order from (seed, epoch), so a run resumed
from a checkpoint repeats an uninterrupted run.
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.common.atomic_io import append_jsonl, atomic_write_json, read_jsonl
from utils.common.precision import weight_dtype as weight_dtype_of
from utils.common.seeding import derive_seed
from utils.method.edge_step import EDGELossConfig, edge_losses
from utils.method.losses import GatheredEDGELosses
from utils.method.movement import mean_abs_pixel_change, relative_change, snapshot
from utils.stages.train_data import dataset_unit
from utils.stages.train_plots import plot_loss_curves, render_validation, validate
from utils.stages.train_run import (LOG_NAME, check_run_folder, finished_run, register_checkpoint_hooks,
                                    resolve_resume, save_checkpoint, save_final_model, trim_log)
from utils.stages.train_setup import (TrainData, TrainModels, build_accelerator, build_ema, build_optimizer,
                                      build_train_data, loss_config, prepare_models)


class TrainingDiverged(RuntimeError):
    """A non-finite loss: training stopped, the last checkpoint is the last good state."""


@dataclass
class TrainSetup:
    """Everything `run_steps` needs, after accelerate's prepare."""

    args: object
    accelerator: object
    cfg: EDGELossConfig
    models: TrainModels
    data: TrainData
    weight_dtype: torch.dtype
    gatherer: object
    ema_unet: object
    optimizer: object
    lr_scheduler: object
    max_train_steps: int
    steps_per_epoch: int
    num_epochs: int
    output_dir: Path
    logging_dir: Path
    start_params: list = None  # trainable weights before the first step (the no-op guard's theta_0)
    start_grid: object = None  # validation samples of the starting model (same prompts and seeds)
    movement: dict = None      # the last {"step", "param_change", "pixel_change"}


# ---------------------------------------------------------------- setup

def _flat_config(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}


def setup_training(args) -> TrainSetup:
    """Everything before the first step, in the order that fixes the random state (scorer, then LoRA init)."""
    from diffusers.optimization import get_scheduler

    check_run_folder(args)
    output_dir = Path(args.output_dir)
    logging_dir = output_dir / (args.logging_dir or "logs")
    accelerator = build_accelerator(args, output_dir, logging_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg = loss_config(args, world)
    weight_dtype = weight_dtype_of(accelerator.mixed_precision)
    models = prepare_models(args, cfg, accelerator.device, weight_dtype)
    gatherer = (GatheredEDGELosses(cfg.temperature, rank, world, cfg.diversity_on, cfg.same_caption_positives)
                if cfg.uses_scorer and args.gather_features and world > 1 else None)
    ema_unet = build_ema(args, models.unet, accelerator.device)
    optimizer = build_optimizer(args, models.params)
    data = build_train_data(args, models.vae, cfg, accelerator, models.scorer)
    steps_per_epoch = math.ceil(math.ceil(len(data.loader) / world) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * world,
                                 num_training_steps=max_train_steps * world)
    models.unet, optimizer, data.loader, lr_scheduler = accelerator.prepare(models.unet, optimizer, data.loader,
                                                                            lr_scheduler)
    steps_per_epoch = math.ceil(len(data.loader) / args.gradient_accumulation_steps)
    if ema_unet is not None:
        accelerator.register_for_checkpointing(ema_unet)
    register_checkpoint_hooks(accelerator, args.trainable)
    s = TrainSetup(args, accelerator, cfg, models, data, weight_dtype, gatherer, ema_unet, optimizer,
                   lr_scheduler, max_train_steps, steps_per_epoch, math.ceil(max_train_steps / steps_per_epoch),
                   output_dir, logging_dir)
    _record_start(s)
    return s


def _record_start(s: TrainSetup) -> None:
    """Keep the starting weights and (with validation prompts) render the starting model's validation samples.

    Runs before a resume loads its checkpoint, so theta_0 is always the model the run started from.
    """
    if not s.accelerator.is_main_process:
        return
    s.start_params = snapshot(s.models.params)
    args, m = s.args, s.models
    if args.validation_prompts:
        unet = s.accelerator.unwrap_model(m.unet)
        with torch.autocast(s.accelerator.device.type, enabled=s.accelerator.mixed_precision != "no"):
            s.start_grid = render_validation(unet, m.vae, m.text_encoder, m.tokenizer, m.noise_scheduler,
                                             args.validation_prompts, args.resolution, args.seed,
                                             args.validation_inference_steps, args.validation_guidance_scale,
                                             s.accelerator.device)


# ---------------------------------------------------------------- resume, loop, end

def resume_position(s: TrainSetup):
    """(global_step, first_epoch, batches to skip in it, checkpoint) of a resumed run; zeros for a new one."""
    args, accelerator = s.args, s.accelerator
    resume = resolve_resume(s.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume is None:
        accelerator.print(f"no checkpoint in {s.output_dir}: starting a new run")
    if resume is None:
        return 0, 0, 0, None
    accelerator.print(f"resuming from {resume}")
    accelerator.load_state(str(resume))
    global_step = int(resume.name.split("-", 1)[1])
    first_epoch = global_step // s.steps_per_epoch
    skip_batches = (global_step % s.steps_per_epoch) * args.gradient_accumulation_steps
    if accelerator.is_main_process:
        trim_log(s.logging_dir / LOG_NAME, global_step)
    if global_step >= s.max_train_steps:  # the last checkpoint is the end: write the final model, train nothing
        s.num_epochs = first_epoch
    return global_step, first_epoch, skip_batches, resume


def _micro_step(s: TrainSetup, batch, epoch: int, gen: torch.Generator, global_step: int, last_ckpt) -> dict:
    """One forward/backward (an optimizer step when gradients sync); returns the loss terms."""
    from utils.models.sd_models import encode_prompts

    args, accelerator, m = s.args, s.accelerator, s.models
    with accelerator.accumulate(m.unet):
        captions = batch["caption"]
        dropped = [bool(args.caption_dropout) and torch.rand((), generator=gen).item() < args.caption_dropout
                   for _ in captions]
        cond_captions = ["" if d else c for c, d in zip(captions, dropped)]
        keep = None  # with gathered features every process passes a mask (the gather is collective)
        if args.caption_dropout and (s.gatherer is not None or any(dropped)):
            keep = torch.tensor([not d for d in dropped], device=accelerator.device)
        with torch.no_grad():  # the empty caption rides along when the EDGE terms read a guided prediction
            hidden = encode_prompts(m.text_encoder, m.tokenizer, cond_captions + ([""] if s.cfg.guided else []),
                                    accelerator.device)
        hidden, uncond = (hidden[:-1], hidden[-1:]) if s.cfg.guided else (hidden, None)
        latent_dist = (s.data.latent_cache.lookup(batch["index"], epoch, accelerator.device)
                       if s.data.latent_cache is not None else None)
        terms = edge_losses(m.unet, m.vae, m.noise_scheduler, m.scorer, batch.get("pixel_values"), captions, hidden,
                            s.cfg, gen, s.weight_dtype, s.gatherer, decoder=m.decoder, latent_dist=latent_dist,
                            keep=keep, uncond_hidden_states=uncond)
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
            accelerator.clip_grad_norm_(m.params, args.max_grad_norm)
        s.optimizer.step()
        s.lr_scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
    return terms


def _log_step(s: TrainSetup, window: dict, window_n: int, global_step: int, epoch: int, t_start: float) -> dict:
    """The step's record (terms averaged over its micro-steps and processes) -> log file and trackers."""
    accelerator = s.accelerator
    means = torch.tensor([window[k] / window_n for k in sorted(window)], device=accelerator.device)
    means = accelerator.reduce(means, reduction="mean")
    record = {"step": global_step, "epoch": epoch, "lr": s.lr_scheduler.get_last_lr()[0],
              **{k: float(v) for k, v in zip(sorted(window), means)}, "time": round(time.time() - t_start, 3)}
    if accelerator.is_main_process:
        append_jsonl(s.logging_dir / LOG_NAME, record)
    accelerator.log({k: v for k, v in record.items() if k not in ("step", "epoch")}, step=global_step)
    return record


def run_steps(s: TrainSetup, global_step: int, first_epoch: int, skip_batches: int, last_ckpt) -> int:
    """The step loop from `global_step` to --max_train_steps (checkpoints, validation grids); returns the step."""
    from tqdm.auto import tqdm

    args, accelerator, loader = s.args, s.accelerator, s.data.loader
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(range(s.max_train_steps), initial=global_step, desc="steps",
               disable=not accelerator.is_local_main_process)
    unwrapped = accelerator.unwrap_model(s.models.unet)
    window, window_n, t_start = {}, 0, time.time()
    s.models.unet.train()
    for epoch in range(first_epoch, s.num_epochs):
        s.data.sampler.use_epoch(epoch)
        s.data.dataset.use_epoch(epoch)
        skip = skip_batches if epoch == first_epoch else 0
        for i, batch in enumerate(accelerator.skip_first_batches(loader, skip) if skip else loader):
            micro = epoch * len(loader) + i + skip
            gen = torch.Generator().manual_seed(derive_seed(args.seed, micro * world + rank))
            terms = _micro_step(s, batch, epoch, gen, global_step, last_ckpt)
            for k, v in terms.items():
                window[k] = window.get(k, 0.0) + float(v.detach())
            window_n += 1
            if not accelerator.sync_gradients:
                continue
            if s.ema_unet is not None:
                s.ema_unet.step(unwrapped.parameters())
            global_step += 1
            bar.update(1)
            record = _log_step(s, window, window_n, global_step, epoch, t_start)
            window, window_n = {}, 0
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                last_ckpt = save_checkpoint(accelerator, s.output_dir, global_step, args.checkpoints_total_limit)
            if (args.validation_prompts and args.validation_steps and global_step % args.validation_steps == 0
                    and global_step < s.max_train_steps):
                _validate(s, unwrapped, global_step)
            if global_step >= s.max_train_steps:
                break
        if global_step >= s.max_train_steps:
            break
    bar.close()
    return global_step


def _validate(s: TrainSetup, unet, step: int) -> None:
    """Validation grid, then how far the weights and the samples moved from the start (logged and printed)."""
    m = s.models
    grid = validate(s.accelerator, s.args, unet, s.ema_unet, m.vae, m.text_encoder, m.tokenizer, m.noise_scheduler,
                    step, s.output_dir)
    if s.accelerator.is_main_process:
        _log_movement(s, step, grid)


def _log_movement(s: TrainSetup, step: int, grid=None) -> dict:
    """{"step", "param_change", "pixel_change"} -> logs/movement.jsonl, trackers and one printed line."""
    if s.start_params is None:
        return None
    record = {"step": step, "param_change": relative_change(s.models.params, s.start_params),
              "pixel_change": (mean_abs_pixel_change(grid, s.start_grid)
                               if grid is not None and s.start_grid is not None else None)}
    append_jsonl(s.logging_dir / "movement.jsonl", record)
    s.accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)
    pixels = "" if record["pixel_change"] is None else \
        f", validation samples changed by {record['pixel_change']:.2f}/255 (mean abs)"
    s.accelerator.print(f"step {step}: trainable weights moved {record['param_change']:.2e} of their norm{pixels}")
    s.movement = record
    return record


def finish(s: TrainSetup, global_step: int) -> None:
    """Last validation grid, the final model (EMA weights if any) and the loss curves."""
    accelerator = s.accelerator
    unwrapped = accelerator.unwrap_model(s.models.unet)
    accelerator.wait_for_everyone()
    if s.args.validation_prompts:
        _validate(s, unwrapped, global_step)
    log_path = s.logging_dir / LOG_NAME
    if accelerator.is_main_process:
        movement = s.movement if s.movement and s.movement["step"] == global_step else _log_movement(s, global_step)
        atomic_write_json(s.logging_dir / "run_summary.json", {"steps": global_step, **(movement or {}),
                                                              "trainable": s.args.trainable})
        save_final_model(s.args, unwrapped, s.ema_unet, s.output_dir)
        if log_path.exists() and read_jsonl(log_path):
            plot_loss_curves(log_path, s.logging_dir / "loss_curves.png", title=f"{s.output_dir.name}: training terms")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def train(args) -> Path:
    """Run stage 1 as configured by the parsed flags; return the output folder."""
    from utils.common.config import save_run_config

    s = setup_training(args)
    accelerator, output_dir = s.accelerator, s.output_dir
    if args.resume_from_checkpoint == "latest" and finished_run(output_dir, args.logging_dir, s.max_train_steps):
        accelerator.print(f"{output_dir} already finished its {s.max_train_steps} steps; nothing to do "
                          f"(raise --max_train_steps to train on)")
        accelerator.end_training()
        return output_dir
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(args, output_dir)
        accelerator.init_trackers("edge_train", config=_flat_config(args)) if args.report_to != "none" else None
    global_step, first_epoch, skip_batches, resume = resume_position(s)
    accelerator.print(f"training {s.models.counts['trainable']:,} of {s.models.counts['total']:,} UNet parameters "
                      f"({args.trainable}); {len(s.data.dataset)} {dataset_unit(s.data.dataset)} per epoch, "
                      f"{s.max_train_steps} steps, batch {args.train_batch_size} x {accelerator.num_processes} "
                      f"processes x {args.gradient_accumulation_steps} accumulation")
    global_step = run_steps(s, global_step, first_epoch, skip_batches, resume)
    finish(s, global_step)
    return output_dir
