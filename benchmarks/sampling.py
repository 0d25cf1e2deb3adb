"""Speed of the sampling stage against the stock StableDiffusionPipeline loop, and fewer steps at equal quality.

Measures, on the same pipeline object and the same per-image seeds:
  1. stock loop: `pipe(prompt, generator=...)` once per image (what the public code does), reference scheduler;
  2. our stage: `utils.stages.sampling.render_images` (batched, one seed per image), same scheduler and steps;
  3. our stage with DPM-Solver++ at fewer steps (20 by default).
and prints images/second ratios. "Equal quality" is measured, not assumed: the mean absolute pixel
distance between the fast images and the reference images from the same seeds, divided by the mean
distance between reference images of different seeds (0 = identical, ~1 = as different as unrelated
samples); with --scorer, also the CLIP score (cosine of image and prompt features) of both sets.

Usage:
    python -m benchmarks.sampling                      # tiny random-init SD on CPU (built in a temp folder)
    python -m benchmarks.sampling --device cuda --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dtype fp16 --num_images 16 --batch_size 8 --scorer open_clip:ViT-B-32/openai
"""
import argparse
import tempfile
import time

import numpy as np
import torch

from utils.stages.sampling import (DTYPES, SCHEDULERS, PromptEncoder, load_sampling_pipeline, render_images,
                                   set_scheduler)
from utils.common.seeding import item_generator, set_cpu_threads

PROMPTS = ["a red circle on a white background", "two blue squares at the top", "a small green star on the left",
           "a yellow triangle and a purple cross", "a large orange circle in the middle", "a grey gradient with a "
           "red star", "three shapes: a circle, a square and a star", "a blue cross at the bottom right"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="SD folder or hub id (default: a tiny random-init SD, 32 px).")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="no")
    p.add_argument("--num_images", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default="default", help="Reference scheduler.")
    p.add_argument("--steps", type=int, default=50, help="Reference steps.")
    p.add_argument("--fast_scheduler", choices=list(SCHEDULERS), default="dpmsolver++")
    p.add_argument("--fast_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--ode_reference", choices=list(SCHEDULERS), default="ddim",
                   help="Deterministic scheduler whose --steps images also serve as a quality reference "
                        "(an ancestral reference such as DDPM does not converge to the same image).")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--scorer", default=None, help="utils.models.scorers spec for a CLIP-score comparison.")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared machine).")
    p.add_argument("--rounds", type=int, default=3,
                   help="Rounds of (stock, ours, fast), interleaved; the fastest round of each counts (load noise).")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def stock_loop(pipe, prompts, seed, steps, guidance):
    """The stock call, one image per pipeline call (per-image seeds, so the images are comparable)."""
    images = [pipe(p, num_inference_steps=steps, guidance_scale=guidance, generator=item_generator(seed, i),
                   output_type="np").images[0] for i, p in enumerate(prompts)]
    return [(im * 255).round() / 255 for im in images]  # the uint8 values a saved PNG would hold


def our_stage(pipe, prompts, seed, steps, guidance, batch_size, height, width):
    """utils.stages.sampling.render_images in batches, as the stage runs."""
    encoder = PromptEncoder(pipe)
    out = []
    for s in range(0, len(prompts), batch_size):
        idx = list(range(s, min(s + batch_size, len(prompts))))
        out += [np.asarray(im, dtype=np.float32) / 255 for im in
                render_images(pipe, encoder, [prompts[i] for i in idx], idx, seed, steps, guidance, height, width)]
    return out


def pixel_agreement(images, reference) -> float:
    """Mean |a - b| between same-seed pairs over the mean between different-seed reference pairs."""
    same = np.mean([np.abs(a - b).mean() for a, b in zip(images, reference)])
    shifted = reference[1:] + reference[:1]
    different = np.mean([np.abs(a - b).mean() for a, b in zip(reference, shifted)])
    return float(same / max(different, 1e-12))


def clip_score(scorer, images, prompts) -> float:
    """Mean cosine similarity between each image and its prompt under a utils.models.scorers scorer."""
    with torch.no_grad():
        pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in images])
        u = scorer.encode_image(pixels.to(scorer.device) * 2 - 1)
        v = scorer.encode_text(list(prompts))
    return float((u * v.to(u.device)).sum(-1).mean())


def main(args):
    """Run the three measurements and print ratios."""
    if args.device == "cpu":
        set_cpu_threads(args.threads)
    tmp = None
    model = args.model
    if model is None:
        from utils.models.tiny import build_tiny_sd

        tmp = tempfile.TemporaryDirectory()
        model = build_tiny_sd(f"{tmp.name}/tiny", resolution=32)
    prompts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f", variant {i}")
               for i in range(args.num_images)]
    pipe = load_sampling_pipeline(model, dtype=args.dtype, scheduler=args.scheduler, device=args.device,
                                  channels_last=args.channels_last)
    from utils.stages.sampling import default_size

    height, width = default_size(pipe)
    ref_sched = type(pipe.scheduler).__name__
    g = args.guidance_scale
    stock_loop(pipe, prompts[:1], args.seed, 2, g)  # warm-up (allocations, kernel selection)
    our_stage(pipe, prompts[:1], args.seed, 2, g, 1, height, width)

    ref_scheduler = pipe.scheduler
    fast_scheduler = set_scheduler(pipe, args.fast_scheduler).scheduler
    t_stock = t_ours = t_fast = float("inf")
    for _ in range(args.rounds):
        pipe.scheduler = ref_scheduler
        stock, t = _timed(lambda: stock_loop(pipe, prompts, args.seed, args.steps, g))
        t_stock = min(t_stock, t)
        ours, t = _timed(lambda: our_stage(pipe, prompts, args.seed, args.steps, g, args.batch_size, height, width))
        t_ours = min(t_ours, t)
        pipe.scheduler = fast_scheduler
        fast, t = _timed(lambda: our_stage(pipe, prompts, args.seed, args.fast_steps, g, args.batch_size, height,
                                           width))
        t_fast = min(t_fast, t)
    same_scheduler_diff = float(np.max([np.abs(a - b).max() for a, b in zip(ours, stock)]))
    set_scheduler(pipe, args.ode_reference)
    ode_name = type(pipe.scheduler).__name__
    ode = our_stage(pipe, prompts, args.seed, args.steps, g, args.batch_size, height, width)
    pipe.scheduler = fast_scheduler
    n = len(prompts)
    print(f"model: {model}  device: {args.device}  dtype: {args.dtype}  {height}x{width}  images: {n}  "
          f"batch: {args.batch_size}  guidance: {g}  best of {args.rounds} interleaved rounds")
    print(f"stock loop, {ref_sched} {args.steps} steps:                 {n / t_stock:.3f} images/s (reference = 1.00x)")
    print(f"our stage,  {ref_sched} {args.steps} steps:                 {t_stock / t_ours:.2f}x images/s "
          f"(max |pixel diff| vs stock {same_scheduler_diff * 255:.0f}/255)")
    print(f"our stage,  {type(pipe.scheduler).__name__} {args.fast_steps} steps: {t_stock / t_fast:.2f}x images/s "
          f"vs stock {args.steps} steps")
    for name, reference in ((ref_sched, stock), (ode_name, ode)):
        mean_abs = np.mean([np.abs(a - b).mean() for a, b in zip(fast, reference)]) * 255
        print(f"agreement of the {args.fast_steps}-step images with {name} {args.steps}-step images (same seeds): "
              f"pixel distance {pixel_agreement(fast, reference):.3f} of the different-seed distance "
              f"(0 = identical; mean |diff| {mean_abs:.1f}/255)")
    if args.scorer:
        from utils.models.scorers import build_scorer

        scorer = build_scorer(args.scorer, device=args.device)
        ref, new = clip_score(scorer, stock, prompts), clip_score(scorer, fast, prompts)
        print(f"CLIP score ({args.scorer}): {args.fast_steps} steps {new:.4f} / {args.steps} steps {ref:.4f} = "
              f"{new / ref:.3f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main(parse_args())
