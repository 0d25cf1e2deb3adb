"""A training run's folder: checkpoints (save, prune, resume, hooks), the step log, the final model, refusals.

Layout: <output_dir>/checkpoint-<step>/ (accelerate state + unet/ or LoRA weights), logs/train_log.jsonl,
run_config.json, and at the end a loadable pipeline (DiffFit/full) or pytorch_lora_weights.safetensors.
"""
import json
import os
import shutil
from pathlib import Path

from utils.common.atomic_io import atomic_write_text, read_jsonl
from utils.common.errors import fail

LOG_NAME = "train_log.jsonl"
FINAL_MODEL_FILES = ("model_index.json", "pytorch_lora_weights.safetensors")


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
    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in records))


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


def check_run_folder(args) -> None:
    """Refuse to mix two runs in one output folder (resume or --overwrite_output_dir are explicit).

    (The generic checks of a folder to write into are `utils.common.atomic_io.check_output_dir`.)
    """
    out = Path(args.output_dir)
    if not out.exists():
        return
    if out.is_file():
        raise fail(f"--output_dir {out} is a file")
    holds = holds_run(out, getattr(args, "logging_dir", "logs"))
    resume = getattr(args, "resume_from_checkpoint", None)
    if holds and not resume and not args.overwrite_output_dir:
        can_resume = hasattr(args, "resume_from_checkpoint")  # VAE pre-training has no checkpoints to resume
        raise fail(f"--output_dir {out} already holds a run; pass "
                   + ("--resume_from_checkpoint latest to continue it, " if can_resume else "")
                   + "--overwrite_output_dir to replace it, or choose another folder")
    if holds and args.overwrite_output_dir and not resume \
            and int(os.environ.get("RANK", "0")) == 0:  # runs before the Accelerator exists
        for p in list_checkpoints(out):
            shutil.rmtree(p, ignore_errors=True)
        (out / "logs" / LOG_NAME).unlink(missing_ok=True)


def save_checkpoint(accelerator, output_dir, global_step: int, total_limit=None) -> Path:
    """accelerator.save_state into output_dir/checkpoint-<step>, keeping at most `total_limit` checkpoints."""
    path = Path(output_dir) / f"checkpoint-{global_step}"
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    return path


def register_checkpoint_hooks(accelerator, trainable: str) -> None:
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
