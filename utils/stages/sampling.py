"""Stage 2 (sampling): draw prompts, render image i from its own seed, resume, write a distilled set.

Determinism rules:
  * prompt i is drawn from the real train captions with a fixed RNG (one caption per distinct image);
  * image i starts from latents drawn with its own generator `utils.common.seeding.item_generator(seed, i)`
    (a list of generators is passed to the pipeline, so batch neighbours never share noise);
  * prompt embeddings are computed one prompt at a time and cached, so they do not depend on batching;
  * work is split into fixed blocks of `batch_size` consecutive indices and block c is rendered by
    process c % K. Block contents therefore do not depend on the number of processes, which keeps the
    set byte-identical for any K. (With batch_size 1 this is the rule "process r renders i % K == r".)

Changing batch_size changes the batch shapes seen by the UNet and VAE; CPU BLAS/oneDNN kernels pick
other blockings (gemv vs gemm, conv algorithms) for other batch sizes, so float sums are reordered
(~1e-6 relative) and, rarely, one uint8 pixel rounds the other way. The manifest records batch_size.
"""
import hashlib
import random
import shutil
import textwrap
from collections import OrderedDict
from pathlib import Path

import torch

from utils.common.atomic_io import atomic_save_image, check_output_dir
from utils.common.errors import fail
from utils.common.seeding import item_generator

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
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_FORMATS = {"png": "PNG"}
# Manifest keys that must match for a rerun to resume into an existing folder (code_version may differ).
SETTINGS_KEYS = ("model", "lora_weights", "scheduler", "num_inference_steps", "guidance_scale", "negative_prompt",
                 "seed", "height", "width", "dtype", "image_format", "num_images", "prompt_source",
                 "prompts_sha256", "batch_size")
PREVIEW_FILE = "preview.png"


# ----------------------------------------------------------------------------- prompts


def draw_prompts(train_entries, num_queries: int, seed: int, source: str = "train captions") -> list:
    """`num_queries` prompts from Karpathy train entries: one caption each of distinct images, no repeats.

    Returns [{"prompt", "image", "image_id"}] (the source image of each prompt). Deterministic in `seed`.
    """
    from dataset.karpathy import group_by_image

    if num_queries <= 0:
        raise fail(f"--num_queries must be positive, got {num_queries}")
    groups = group_by_image(train_entries)
    if num_queries > len(groups):
        raise fail(f"--num_queries {num_queries} exceeds the {len(groups)} distinct images of {source}")
    rng = random.Random(f"edge-sampling-prompts:{int(seed)}")
    chosen = rng.sample(range(len(groups)), num_queries)
    return [{"prompt": rng.choice(groups[g]["captions"]), "image": groups[g]["image"],
             "image_id": groups[g]["image_id"]} for g in chosen]


def read_prompts_file(path, num_queries: int = None) -> list:
    """Prompts from a text file, one per line (the first `num_queries` when given); empty lines are errors."""
    path = Path(path)
    if not path.is_file():
        raise fail(f"prompts file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise fail(f"prompts file {path} is not UTF-8 text: {e}")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            raise fail(f"prompts file {path} line {n}: empty prompt")
    if not lines:
        raise fail(f"prompts file {path} holds no prompts")
    if num_queries is not None:
        if num_queries <= 0:
            raise fail(f"--num_queries must be positive, got {num_queries}")
        if num_queries > len(lines):
            raise fail(f"--num_queries {num_queries} exceeds the {len(lines)} prompts in {path}")
        lines = lines[:num_queries]
    return [line.strip() for line in lines]


def prompts_digest(prompts) -> str:
    """SHA-256 of the prompt list (detects a changed prompt source on resume)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8") + b"\n")
    return h.hexdigest()


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
    pipe = load_sd_pipeline(model, torch_dtype=DTYPES[dtype])
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


class PromptEmbeddingCache:
    """Text-encoder states computed once per distinct prompt (one prompt at a time, so batch-independent).

    The negative prompt ("" when none) is encoded once. A bounded LRU keeps memory flat on long runs.
    """

    def __init__(self, pipe, negative_prompt: str = None, max_entries: int = 512):
        self.pipe = pipe
        self.negative_prompt = negative_prompt or ""
        self.max_entries = max_entries
        self._cache = OrderedDict()
        self._negative = None
        self.encoded = 0  # number of text-encoder calls (for tests and benchmarks)

    @torch.no_grad()
    def _encode(self, prompt: str) -> torch.Tensor:
        self.encoded += 1
        embeds, _ = self.pipe.encode_prompt(prompt, self.pipe._execution_device, 1, False)
        return embeds

    def prompt(self, prompt: str) -> torch.Tensor:
        """[1, tokens, dim] states of `prompt`."""
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        embeds = self._encode(prompt)
        self._cache[prompt] = embeds
        if len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return embeds

    def negative(self) -> torch.Tensor:
        """[1, tokens, dim] states of the negative prompt."""
        if self._negative is None:
            self._negative = self._encode(self.negative_prompt)
        return self._negative


@torch.no_grad()
def render_images(pipe, cache: PromptEmbeddingCache, prompts, indices, seed: int, num_inference_steps: int,
                  guidance_scale: float, height: int, width: int) -> list:
    """PIL images for `prompts`; image `indices[k]` uses the generator `item_generator(seed, indices[k])`."""
    if len(prompts) != len(indices):
        raise ValueError("one prompt per index")
    generators = [item_generator(seed, i) for i in indices]
    kwargs = dict(prompt_embeds=torch.cat([cache.prompt(p) for p in prompts]),
                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                  width=width, generator=generators, output_type="pil")
    if guidance_scale > 1:
        kwargs["negative_prompt_embeds"] = cache.negative().expand(len(prompts), -1, -1)
    return pipe(**kwargs).images


# ----------------------------------------------------------------------------- output folder


def image_relpath(index: int, image_format: str = "png") -> str:
    """The distilled-set path of image `index`: images/000123.png."""
    return f"images/{index:06d}.{image_format}"


def blocks_for_process(num_images: int, batch_size: int, process_index: int, num_processes: int) -> list:
    """Index blocks [c*B, (c+1)*B) with c % num_processes == process_index (see the module docstring)."""
    if batch_size <= 0:
        raise fail(f"--batch_size must be positive, got {batch_size}")
    blocks = [list(range(s, min(s + batch_size, num_images))) for s in range(0, num_images, batch_size)]
    return [b for c, b in enumerate(blocks) if c % num_processes == process_index]


def settings_differences(existing: dict, settings: dict) -> list:
    """Names of the SETTINGS_KEYS whose values differ between an existing manifest and `settings`."""
    return [k for k in SETTINGS_KEYS if existing.get(k) != settings.get(k)]


def check_existing_set(output_dir, settings: dict, overwrite: bool) -> bool:
    """Decide whether `output_dir` can receive this set; True when it must be cleared first (--overwrite).

    Refuses (InputError) a folder holding a set made with other settings, or images/annotations without
    a manifest, unless `overwrite`. Read-only: every process may call it.
    """
    from dataset.distilled import MANIFEST_FILE, read_manifest

    output_dir = Path(output_dir)
    if not output_dir.exists():
        return False
    if output_dir.is_file():
        raise fail(f"--output_dir {output_dir} is a file")
    has_content = any((output_dir / n).exists() for n in ("images", "annotations", MANIFEST_FILE))
    if not has_content:
        return False
    manifest = read_manifest(output_dir)
    if not manifest:
        if overwrite:
            return True
        raise fail(f"{output_dir} holds images/ or annotations/ without a {MANIFEST_FILE} (a foreign or damaged "
                   f"set); pass --overwrite to replace it or choose another --output_dir")
    diffs = settings_differences(manifest, settings)
    if not diffs:
        return False
    if overwrite:
        return True
    shown = ", ".join(f"{k}: {manifest.get(k)!r} -> {settings.get(k)!r}" for k in diffs[:3])
    more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise fail(f"{output_dir} holds a set made with other settings ({shown}{more}); pass --overwrite to replace "
               f"it or choose another --output_dir")


def clear_output_dir(output_dir) -> None:
    """Remove the files of a previous set (images/, annotations/, manifest.json, preview) from `output_dir`."""
    from dataset.distilled import MANIFEST_FILE

    output_dir = Path(output_dir)
    for name in ("images", "annotations"):
        if (output_dir / name).exists():
            shutil.rmtree(output_dir / name)
    for name in (MANIFEST_FILE, PREVIEW_FILE):
        (output_dir / name).unlink(missing_ok=True)


def image_is_complete(path) -> bool:
    """True when `path` is a whole, decodable image (a 0-byte or truncated file from a killed run is not)."""
    from PIL import Image

    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
        with Image.open(path) as image:
            image.load()  # full decode: verify() alone misses a file cut after its last complete chunk
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means "render it again"
        return False


def missing_indices(output_dir, num_images: int, image_format: str = "png") -> list:
    """Indices whose image file does not exist yet or is broken (empty or truncated)."""
    output_dir = Path(output_dir)
    return [i for i in range(num_images) if not image_is_complete(output_dir / image_relpath(i, image_format))]


def render_blocks(pipe, cache, prompts, blocks, output_dir, seed, num_inference_steps, guidance_scale, height,
                  width, image_format="png", progress=True, desc="sampling", position=0) -> int:
    """Render every block with at least one missing image and write its missing images atomically.

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
        images = render_images(pipe, cache, [prompts[i] for i in block], block, seed, num_inference_steps,
                               guidance_scale, height, width)
        for i, image in zip(block, images):
            path = output_dir / image_relpath(i, image_format)
            if i in broken:
                atomic_save_image(path, image, format=IMAGE_FORMATS[image_format])
                written += 1
        bar.update(len(block))
    bar.close()
    return written


def finalize_set(output_dir, prompts, image_format="png", preview_n: int = 16) -> Path:
    """Write annotations, metadata and the completed manifest (all images must exist), and the preview grid."""
    from dataset.distilled import write_distilled_set

    output_dir = Path(output_dir)
    missing = missing_indices(output_dir, len(prompts), image_format)
    if missing:
        raise RuntimeError(f"{len(missing)} images still missing in {output_dir} (first: {missing[0]})")
    records = [{"image": image_relpath(i, image_format), "captions": [p]} for i, p in enumerate(prompts)]
    write_distilled_set(output_dir, records, {"status": "complete"})
    if preview_n > 0:
        save_preview(output_dir, records[:preview_n])
    return output_dir


# ----------------------------------------------------------------------------- preview


def labelled_grid(images, labels, cell: int = 192, cols: int = None):
    """A grid of images (resized to `cell` px) with each label wrapped below its image."""
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    chars = max(8, cell // 7)
    line_h = 12
    n_lines = 4
    cols = cols or min(4, len(images))
    rows = -(-len(images) // cols)
    cells = []
    for image, label in zip(images, labels):
        canvas = Image.new("RGB", (cell + 6, cell + n_lines * line_h + 8), "white")  # margin between cells
        canvas.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST if image.width < cell else
                                                 Image.BICUBIC), (0, 0))
        draw = ImageDraw.Draw(canvas)
        lines = textwrap.wrap(label, chars)[:n_lines]
        for k, line in enumerate(lines):
            draw.text((2, cell + 2 + k * line_h), line, fill="black", font=font)
        cells.append(canvas)
    while len(cells) < rows * cols:
        cells.append(Image.new("RGB", cells[0].size, "white"))
    return make_image_grid(cells, rows=rows, cols=cols)


def save_preview(output_dir, records, cell: int = 192) -> Path:
    """Write preview.png: the first images of the set labelled with their first caption."""
    from dataset.images import load_image

    output_dir = Path(output_dir)
    images = [load_image(output_dir / r["image"]) for r in records]
    grid = labelled_grid(images, [r["captions"][0] for r in records], cell=cell)
    path = output_dir / PREVIEW_FILE
    atomic_save_image(path, grid, format="PNG")
    return path


# ----------------------------------------------------------------------------- legacy layout


def convert_legacy(legacy_dir, output_dir, overwrite: bool = False, preview_n: int = 16, manifest: dict = None):
    """Convert the public EDGE code's layout (images/{i}.png + prompts/{i}.txt) into a distilled-set folder.

    Images are taken in increasing i and renumbered 0..n-1; the original numbers are kept in the manifest.
    """
    from dataset.distilled import write_distilled_set, write_manifest
    from dataset.images import load_image

    legacy_dir, output_dir = Path(legacy_dir), Path(output_dir)
    check_output_dir(output_dir)
    img_dir, txt_dir = legacy_dir / "images", legacy_dir / "prompts"
    for d in (img_dir, txt_dir):
        if not d.is_dir():
            raise fail(f"{legacy_dir} is not in the legacy layout: {d} is missing (expected images/{{i}}.png and "
                       f"prompts/{{i}}.txt)")
    images = {}
    for p in img_dir.iterdir():
        if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and p.stem.isdigit():
            if int(p.stem) in images:
                raise fail(f"{legacy_dir}: two images numbered {int(p.stem)} ({images[int(p.stem)].name}, {p.name})")
            images[int(p.stem)] = p
    prompts = {int(p.stem): p for p in txt_dir.glob("*.txt") if p.stem.isdigit()}
    if not images:
        raise fail(f"{img_dir} holds no numbered images ({{i}}.png)")
    for i in sorted(images):
        if i not in prompts:
            raise fail(f"{legacy_dir}: image {images[i].name} has no prompt file {txt_dir / f'{i}.txt'}")
    for i in sorted(prompts):
        if i not in images:
            raise fail(f"{legacy_dir}: prompt file {prompts[i].name} has no image {img_dir / f'{i}.png'}")
    order = sorted(images)
    settings = {"converted_from": str(legacy_dir.resolve()), "legacy_indices": order}
    if output_dir.exists() and any((output_dir / n).exists() for n in ("images", "annotations", "manifest.json")):
        if not overwrite:
            raise fail(f"{output_dir} already holds a set; pass --overwrite to replace it or choose another "
                       f"--output_dir")
        clear_output_dir(output_dir)
    records = []
    for new, old in enumerate(order):
        text = prompts[old].read_text(encoding="utf-8").strip()
        if not text:
            raise fail(f"prompt file {prompts[old]} is empty")
        rel = image_relpath(new, "png")
        atomic_save_image(output_dir / rel, load_image(images[old]), format="PNG")
        records.append({"image": rel, "captions": [text]})
    from utils.common.config import code_version

    write_manifest(output_dir, {"stage": "sampling", "status": "in_progress", "prompt_source": "legacy layout",
                                **settings, **(manifest or {}), "code_version": code_version()})
    write_distilled_set(output_dir, records, {"status": "complete"})
    if preview_n > 0:
        save_preview(output_dir, records[:preview_n])
    return output_dir


# ----------------------------------------------------------------------------- the whole stage


def model_identity(model) -> str:
    """How the model is named in the manifest: the absolute path of a local folder, else the hub id."""
    path = Path(str(model))
    return str(path.resolve()) if path.exists() else str(model)


def sample_distilled_set(model, prompts, prompt_source: dict, output_dir, *, scheduler="default",
                         num_inference_steps=50, guidance_scale=7.5, height=None, width=None, negative_prompt=None,
                         dtype="no", seed=0, batch_size=1, lora_weights=None, overwrite=False, preview_n=16,
                         image_format="png", channels_last=False, attention="sdpa", progress=True) -> Path:
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
    if image_format not in IMAGE_FORMATS:
        raise fail(f"unknown image format {image_format!r}; choose from {', '.join(IMAGE_FORMATS)}")
    if num_inference_steps <= 0:
        raise fail(f"--num_inference_steps must be positive, got {num_inference_steps}")
    if not prompts:
        raise fail("no prompts to render")
    blocks_for_process(len(prompts), batch_size, 0, 1)  # validates batch_size before the model loads
    output_dir = Path(output_dir)
    check_output_dir(output_dir)  # a file or a read-only folder: one line now, not after the model loads
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
    cache = PromptEmbeddingCache(pipe, negative_prompt)
    desc = "sampling" if state.num_processes == 1 else f"sampling [process {state.process_index}]"
    render_blocks(pipe, cache, prompts, blocks, output_dir, seed, num_inference_steps, guidance_scale, height,
                  width, image_format, progress=progress, desc=desc, position=state.process_index)
    state.wait_for_everyone()
    if state.is_main_process:
        finalize_set(output_dir, prompts, image_format, preview_n)
    state.wait_for_everyone()
    return output_dir
