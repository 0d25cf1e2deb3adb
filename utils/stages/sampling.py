"""Stage 2 (sampling): draw prompts, render image i from its own seed, resume, write a distilled set.

Determinism rules:
  * prompt i is drawn from the real train captions with a fixed RNG (one caption per distinct image);
  * image i starts from latents drawn with its own generator `utils.common.seeding.item_generator(seed, i)`
    (a list of generators is passed to the pipeline, so batch neighbours never share noise);
  * prompt embeddings are computed one prompt at a time, so they do not depend on batching;
  * work is split into fixed blocks of `batch_size` consecutive indices and block c is rendered by
    process c % K. Block contents therefore do not depend on the number of processes, which keeps the
    set byte-identical for any K. (With batch_size 1 this is the rule "process r renders i % K == r".)
    accelerate's `PartialState.split_between_processes` is not used: it hands each process one contiguous
    run of indices, so batch contents, and with them each image's float rounding, would change with K.

Changing batch_size changes the batch shapes seen by the UNet and VAE; CPU BLAS/oneDNN kernels pick
other blockings (gemv vs gemm, conv algorithms) for other batch sizes, so float sums are reordered
(~1e-6 relative) and, rarely, one uint8 pixel rounds the other way. The manifest records batch_size.
"""
from pathlib import Path

import torch

from utils.common.atomic_io import atomic_save_image, check_output_dir
from utils.common.errors import fail
from utils.common.precision import weight_dtype
from utils.common.seeding import item_generator
from utils.stages.best_of import candidate_scores, candidate_seed, pick_best
from utils.stages.sampled_set import (blocks_for_process, check_existing_set, clear_output_dir, finalize_set,
                                      image_is_complete, image_relpath)
from utils.stages.sampling_prompts import prompts_digest

# name -> (diffusers scheduler class, config overrides); "default" keeps the model's own scheduler.
SCHEDULERS = {
    "default": (None, {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsolver++_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++",
                                                           "use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
DTYPES = ("no", "fp16", "bf16")  # precisions of the sampling pipeline (torch dtypes: utils.common.precision)
IMAGE_FORMATS = {"png": "PNG"}
DEFAULT_GUIDANCE_SCALE = 7.5  # the SD pipeline's classifier-free guidance default


# ----------------------------------------------------------------------------- model


def set_scheduler(pipe, name: str):
    """Replace the pipeline's scheduler by `name` (see SCHEDULERS), built from the model's scheduler config."""
    if name not in SCHEDULERS:
        raise fail(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    cls_name, overrides = SCHEDULERS[name]
    if cls_name is None:
        return pipe
    import diffusers

    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)
    return pipe


def load_sampling_pipeline(model, dtype: str = "no", scheduler: str = "default", lora_weights=None,
                           device="cpu", channels_last: bool = False, attention: str = "sdpa"):
    """Load a StableDiffusionPipeline for sampling: dtype, scheduler, optional LoRA, memory format, attention."""
    from utils.models.sd_models import load_sd_pipeline

    if dtype not in DTYPES:
        raise fail(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    _refuse_lora_only_folder(model)
    pipe = load_sd_pipeline(model, torch_dtype=weight_dtype(dtype))
    if lora_weights:
        path = Path(str(lora_weights))
        if not path.exists():
            raise fail(f"--lora_weights not found: {path}")
        try:
            pipe.load_lora_weights(str(path))
        except Exception as e:  # noqa: BLE001 - any loader failure is a bad input here
            raise fail(f"could not load LoRA weights from {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    set_scheduler(pipe, scheduler)
    pipe.to(device)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if attention == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
        pipe.vae.set_attn_processor(AttnProcessor())
    elif attention != "sdpa":
        raise fail(f"unknown attention {attention!r}; choose sdpa or eager")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _refuse_lora_only_folder(model) -> None:
    """A LoRA run folder is not a pipeline: say which flags to use (and the base model it was trained on)."""
    import json

    path = Path(str(model))
    if not path.is_dir() or (path / "model_index.json").exists():
        return
    if not any(path.glob("*lora*.safetensors")) and not any(path.glob("*lora*.bin")):
        return
    base = None
    if (path / "run_config.json").is_file():
        try:
            base = json.loads((path / "run_config.json").read_text()).get("args", {}).get(
                "pretrained_model_name_or_path")
        except (json.JSONDecodeError, AttributeError):
            base = None
    raise fail(f"{path} holds LoRA weights, not a full pipeline: pass the base model as "
               f"--pretrained_model_name_or_path{f' ({base})' if base else ''} and {path} as --lora_weights")


def default_size(pipe) -> tuple:
    """(height, width) the model was trained at: unet sample_size times the VAE scale factor."""
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(h * pipe.vae_scale_factor), int(w * pipe.vae_scale_factor)


class PromptEncoder:
    """Text-encoder states, each prompt encoded alone (so they do not depend on batching); the negative
    prompt ("" when none) is encoded once."""

    def __init__(self, pipe, negative_prompt: str = None):
        self.pipe = pipe
        self.negative_prompt = negative_prompt or ""
        self._negative = None

    @torch.no_grad()
    def encode(self, prompts) -> torch.Tensor:
        """[len(prompts), tokens, dim] states of `prompts`."""
        device = self.pipe._execution_device
        return torch.cat([self.pipe.encode_prompt(p, device, 1, False)[0] for p in prompts])

    def negative(self, n: int) -> torch.Tensor:
        """[n, tokens, dim] states of the negative prompt (encoded on first use)."""
        if self._negative is None:
            self._negative = self.encode([self.negative_prompt])
        return self._negative.expand(n, -1, -1)


@torch.no_grad()
def render_images(pipe, encoder: PromptEncoder, prompts, indices, seed: int, num_inference_steps: int,
                  guidance_scale: float, height: int, width: int, candidate: int = 0) -> list:
    """PIL images for `prompts`; image `indices[k]` uses the generator `item_generator(seed, indices[k])`
    (candidate j > 0 of best-of-k: seeded by `best_of.candidate_seed(seed, indices[k], j)`)."""
    if len(prompts) != len(indices):
        raise ValueError("one prompt per index")
    generators = [item_generator(seed, i) if candidate == 0 else
                  torch.Generator().manual_seed(candidate_seed(seed, i, candidate)) for i in indices]
    kwargs = dict(prompt_embeds=encoder.encode(prompts),
                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                  width=width, generator=generators, output_type="pil")
    if guidance_scale > 1:
        kwargs["negative_prompt_embeds"] = encoder.negative(len(prompts))
    return pipe(**kwargs).images


# ----------------------------------------------------------------------------- output folder


def render_blocks(pipe, encoder, prompts, blocks, output_dir, seed, num_inference_steps, guidance_scale, height,
                  width, image_format="png", progress=True, desc="sampling", position=0, best_of=1,
                  scorer=None) -> int:
    """Render every block with at least one missing image and write its missing images atomically.

    With best_of k > 1, k candidates per image are drawn and the one `scorer` ranks highest for its
    prompt is kept (utils.stages.best_of).

    A whole block is re-rendered (never a partial one) so a resumed set equals an uninterrupted one.
    Existing files are decoded first: an empty or truncated image (left by a crash outside the atomic
    writer, or a copy cut short) counts as missing and is rendered again. Returns the number written.
    """
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    broken = {i for b in blocks for i in b if not image_is_complete(output_dir / image_relpath(i, image_format))}
    todo = [b for b in blocks if any(i in broken for i in b)]
    bar = tqdm(total=sum(len(b) for b in todo), desc=desc, unit="img", disable=not progress, position=position)
    written = 0
    for block in todo:
        block_prompts = [prompts[i] for i in block]
        candidates = [render_images(pipe, encoder, block_prompts, block, seed, num_inference_steps, guidance_scale,
                                    height, width, candidate=j) for j in range(best_of)]
        images = candidates[0]
        if best_of > 1:
            choice = pick_best(candidate_scores(scorer, candidates, block_prompts))
            images = [candidates[j][k] for k, j in enumerate(choice)]
        for i, image in zip(block, images):
            path = output_dir / image_relpath(i, image_format)
            if i in broken:
                atomic_save_image(path, image, format=IMAGE_FORMATS[image_format])
                written += 1
        bar.update(len(block))
    bar.close()
    return written


# ----------------------------------------------------------------------------- the whole stage


def model_identity(model) -> str:
    """How the model is named in the manifest: the absolute path of a local folder, else the hub id."""
    path = Path(str(model))
    return str(path.resolve()) if path.exists() else str(model)


def _check_inputs(prompts, output_dir, num_inference_steps, image_format, batch_size, best_of, best_of_scorer):
    """The stage's checks that need no model, one line each, before the pipeline loads."""
    if image_format not in IMAGE_FORMATS:
        raise fail(f"unknown image format {image_format!r}; choose from {', '.join(IMAGE_FORMATS)}")
    if num_inference_steps <= 0:
        raise fail(f"--num_inference_steps must be positive, got {num_inference_steps}")
    if not prompts:
        raise fail("no prompts to render")
    if best_of < 1:
        raise fail(f"--best_of must be at least 1, got {best_of}")
    if best_of > 1 and not best_of_scorer:
        raise fail("--best_of > 1 needs --best_of_scorer (the retrieval model that ranks the candidates)")
    blocks_for_process(len(prompts), batch_size, 0, 1)  # validates batch_size
    check_output_dir(output_dir)  # a file or a read-only folder: one line now, not after the model loads


def sample_distilled_set(model, prompts, prompt_source: dict, output_dir, *, scheduler="default",
                         num_inference_steps=50, guidance_scale=DEFAULT_GUIDANCE_SCALE, height=None, width=None,
                         negative_prompt=None, dtype="no", seed=0, batch_size=1, lora_weights=None, overwrite=False,
                         preview_n=16, image_format="png", channels_last=False, attention="sdpa", progress=True,
                         best_of=1, best_of_scorer=None) -> Path:
    """Render one image per prompt into a distilled-set folder, across all processes of the launch.

    Every process calls this. Process r renders blocks c with c % K == r; a rerun renders only blocks with
    missing images; the main process writes the manifest first (status "in_progress") and the annotation
    files once every process has finished.
    """
    from accelerate import PartialState

    from dataset.distilled import write_manifest

    from utils.common.config import code_version
    from utils.common.seeding import set_cpu_threads

    state = PartialState()
    if state.device.type == "cpu":
        set_cpu_threads()
    output_dir = Path(output_dir)
    _check_inputs(prompts, output_dir, num_inference_steps, image_format, batch_size, best_of, best_of_scorer)
    pipe = load_sampling_pipeline(model, dtype=dtype, scheduler=scheduler, lora_weights=lora_weights,
                                  device=state.device, channels_last=channels_last, attention=attention)
    dh, dw = default_size(pipe)
    height, width = height or dh, width or dw
    if height % 8 or width % 8:  # the SD pipeline's own requirement
        raise fail(f"--height/--width must be multiples of 8, got {height}x{width}")
    settings = {
        "stage": "sampling",
        "status": "in_progress",
        "model": model_identity(model),
        "lora_weights": model_identity(lora_weights) if lora_weights else None,
        "scheduler": scheduler,
        "scheduler_class": type(pipe.scheduler).__name__,
        "num_inference_steps": int(num_inference_steps),
        "guidance_scale": float(guidance_scale),
        "negative_prompt": negative_prompt or None,
        "seed": int(seed),
        "seed_rule": "image i starts from latents drawn with torch.Generator(cpu) seeded by "
                     "utils.common.seeding.derive_seed(seed, i)",
        "height": int(height),
        "width": int(width),
        "dtype": dtype,
        "image_format": image_format,
        "batch_size": int(batch_size),
        "num_images": len(prompts),
        "prompt_source": prompt_source,
        "prompts_sha256": prompts_digest(prompts),
        **({"best_of": int(best_of), "best_of_scorer": str(best_of_scorer)} if best_of > 1 else {}),
        "code_version": code_version(),
    }
    must_clear = check_existing_set(output_dir, settings, overwrite)
    state.wait_for_everyone()
    if state.is_main_process:
        if must_clear:
            clear_output_dir(output_dir)
        (output_dir / "images").mkdir(parents=True, exist_ok=True)
        write_manifest(output_dir, settings)
    state.wait_for_everyone()

    blocks = blocks_for_process(len(prompts), batch_size, state.process_index, state.num_processes)
    encoder = PromptEncoder(pipe, negative_prompt)
    scorer = None
    if best_of > 1:
        from utils.models.scorers import build_scorer

        scorer = build_scorer(best_of_scorer, device=state.device).freeze_and_move()
    desc = "sampling" if state.num_processes == 1 else f"sampling [process {state.process_index}]"
    render_blocks(pipe, encoder, prompts, blocks, output_dir, seed, num_inference_steps, guidance_scale, height,
                  width, image_format, progress=progress, desc=desc, position=state.process_index, best_of=best_of,
                  scorer=scorer)
    state.wait_for_everyone()
    if state.is_main_process:
        finalize_set(output_dir, prompts, image_format, preview_n)
    state.wait_for_everyone()
    return output_dir
