"""The Markdown report of benchmarks/cost_model.py: per-sample GFLOP, whole runs in GPU-hours, what each
speed-up saves. Pure formatting of the counts `cost_model.count_all` returns."""
from benchmarks.cost_model import (PAPER_EDGE_GPU_HOURS, PAPER_LORS_GPU_HOURS, SCORER_RESOLUTION, PartFlops,
                                   cache_flops, edge_sample_flops, gpu_hours, implied_mfu, plain_sample_flops,
                                   sampling_flops, training_flops, training_steps)


def _g(flops: float) -> str:
    return f"{flops / 1e9:,.1f}" if flops >= 1e8 else f"{flops / 1e9:.4f}"


def _h(hours: float) -> str:
    return f"{hours:,.2f}" if abs(hours) < 10 else f"{hours:,.1f}"


def report(counts: dict, args) -> str:
    """The Markdown tables of the cost model for the counts of `count_all` and the run's flags."""
    lines = _per_sample_table(counts, args)
    whole, edge_total, sample_flops = _whole_runs_table(counts, args)
    return "\n".join(lines + whole + _speedups_table(counts, args, edge_total, sample_flops))


def _hours(args):
    """GPU-hours at --mfu, and the "fast–slow" span over --mfu_range, of a FLOP count."""
    lo, hi = sorted(args.mfu_range)
    def hours(f):
        return gpu_hours(f, args.peak_tflops, args.mfu)

    def span(f):
        return f"{_h(gpu_hours(f, args.peak_tflops, hi))}–{_h(gpu_hours(f, args.peak_tflops, lo))}"
    return hours, span


def _per_sample_table(counts: dict, args) -> list:
    """The header paragraph and the per-sample GFLOP table (lines)."""
    res_list = sorted({args.public_resolution, args.resolution})
    lo, hi = sorted(args.mfu_range)
    samples = args.pairs * args.epochs
    steps = training_steps(args.pairs, args.batch_size, args.epochs)
    loss_step = counts["edge_loss_per_step"]
    by = counts["by_res"]
    lines = []
    add = lines.append

    add(f"Counted with FlopCounterMode on the meta device at batch 1 (linear in the batch). "
        f"GPU-hours on one RTX A5000 at {args.peak_tflops:g} TFLOPS dense fp16 x MFU {args.mfu:g} "
        f"(range: MFU {hi:g}–{lo:g}). Training: {args.epochs} epochs x {args.pairs:,} pairs = {samples:,} "
        f"samples, batch {args.batch_size} ({steps:,} steps), DiffFit (bias + norm) UNet. "
        f"Sampling: {args.num_images} images at {args.sample_resolution} px, {args.steps} steps, "
        f"{args.unet_evals_per_step} UNet evaluations per step (classifier-free guidance).")
    add("")
    add("**Per training sample, GFLOP** (forward; backward counted directly with training's requires_grad)")
    add("")
    add("| part | " + " | ".join(f"{r} px ({r // 8}x{r // 8} latents)" for r in res_list) + " |")
    add("|---|" + "---:|" * len(res_list))
    rows = [
        ("CLIP ViT-L/14 text encoder, forward (frozen, cacheable)", lambda b: b["parts"].text_encoder),
        ("VAE encode, forward (frozen, cacheable)", lambda b: b["parts"].vae_encode),
        ("UNet forward", lambda b: b["parts"].unet_forward),
        ("UNet backward, DiffFit (bias + norm weight gradients)", lambda b: b["parts"].unet_backward),
        ("UNet backward, full fine-tuning", lambda b: b["unet_backward_full"]),
        ("VAE decode of the x0 estimate, forward", lambda b: b["parts"].vae_decode_forward),
        ("VAE decode, backward (activation gradients)", lambda b: b["parts"].vae_decode_backward),
        ("scorer ViT-B/32 image forward (224 px)", lambda b: b["parts"].scorer_image_forward),
        ("scorer image backward (activation gradients)", lambda b: b["parts"].scorer_image_backward),
        ("scorer ViT-B/32 text forward (cacheable)", lambda b: b["parts"].scorer_text),
        (f"EDGE losses forward + backward (batch {args.batch_size}, per sample)",
         lambda b: loss_step / args.batch_size),
        ("**plain fine-tuning sample** (UNet fwd + bwd + encoders)", lambda b: plain_sample_flops(b["parts"])),
        ("**EDGE sample** (plain + decode + scorer, fwd + bwd)",
         lambda b: edge_sample_flops(b["parts"]) + loss_step / args.batch_size),
        ("check: UNet -> x0 -> decode -> scorer counted in one pass",
         lambda b: b["edge_step"]),
        ("  same parts summed", lambda b: sum((b["parts"].unet_forward, b["parts"].unet_backward,
                                               b["parts"].vae_decode_forward, b["parts"].vae_decode_backward,
                                               b["parts"].scorer_image_forward, b["parts"].scorer_image_backward))),
    ]
    for name, fn in rows:
        add(f"| {name} | " + " | ".join(_g(fn(by[r])) for r in res_list) + " |")
    add("| EDGE sample / plain sample | " + " | ".join(
        f"{edge_sample_flops(by[r]['parts']) / plain_sample_flops(by[r]['parts']):.2f}x" for r in res_list) + " |")
    add("")
    return lines


def _whole_runs_table(counts: dict, args):
    """The whole-run table (lines), the EDGE total FLOPs per training resolution, and the sampling FLOPs."""
    res_list = sorted({args.public_resolution, args.resolution})
    lo, hi = sorted(args.mfu_range)
    hours, span = _hours(args)
    loss_step = counts["edge_loss_per_step"]
    by = counts["by_res"]
    lines = []
    add = lines.append
    sample_flops = sampling_flops(by[args.sample_resolution]["parts"].unet_forward, counts["text_encoder"],
                                  by[args.sample_resolution]["parts"].vae_decode_forward, args.num_images,
                                  args.steps, args.unet_evals_per_step)
    add(f"**Whole runs** (GPU-hours at MFU {args.mfu:g}; range at MFU {hi:g}–{lo:g})")
    add("")
    add("| run | PFLOP | GPU-h | range | MFU that makes it 13.6 h |")
    add("|---|---:|---:|---:|---:|")
    edge_total = {}
    for r in res_list:
        p = by[r]["parts"]
        plain = training_flops(plain_sample_flops(p), args.pairs, args.epochs)
        edge = training_flops(edge_sample_flops(p), args.pairs, args.epochs, loss_step, args.batch_size)
        edge_total[r] = edge + sample_flops
        add(f"| plain fine-tuning at {r} px | {plain / 1e15:,.0f} | {_h(hours(plain))} | {span(plain)} | |")
        add(f"| EDGE fine-tuning at {r} px | {edge / 1e15:,.0f} | {_h(hours(edge))} | {span(edge)} | |")
    add(f"| sampling {args.num_images} images, {args.steps} steps, {args.sample_resolution} px | "
        f"{sample_flops / 1e15:,.1f} | {_h(hours(sample_flops))} | {span(sample_flops)} | |")
    for r in res_list:
        f = edge_total[r]
        add(f"| **EDGE total: fine-tuning at {r} px + sampling** | {f / 1e15:,.0f} | **{_h(hours(f))}** | "
            f"{span(f)} | {implied_mfu(f, PAPER_EDGE_GPU_HOURS, args.peak_tflops):.2f} |")
    add(f"| paper: EDGE, 500-pair Flickr30K set | | {PAPER_EDGE_GPU_HOURS} | | |")
    add(f"| paper: LoRS, same set | | {PAPER_LORS_GPU_HOURS} | | |")
    add("")
    return lines, edge_total, sample_flops


def _speedups_table(counts: dict, args, edge_total: dict, sample_flops: float) -> list:
    """The table of what each speed-up saves (lines)."""
    res_list = sorted({args.public_resolution, args.resolution})
    hours, _ = _hours(args)
    samples = args.pairs * args.epochs
    loss_step = counts["edge_loss_per_step"]
    by = counts["by_res"]
    lines = []
    add = lines.append
    add(f"**What each speed-up saves** (GPU-hours at MFU {args.mfu:g}; share of the EDGE total "
        f"fine-tuning + sampling at that training resolution; negative = extra cost)")
    add("")
    add("| speed-up | " + " | ".join(f"train at {r} px" for r in res_list) + " |")
    add("|---|" + "---:|" * len(res_list))
    sr = by[SCORER_RESOLUTION]

    def saved(fn):
        cells = []
        for r in res_list:
            f = fn(by[r])
            cells.append(f"{_h(hours(f))} h ({100 * f / edge_total[r]:.0f}%)")
        return " | ".join(cells)

    decode = lambda b: b["parts"].vae_decode_forward + b["parts"].vae_decode_backward  # noqa: E731
    add(f"| (a) decode for the scorer at {SCORER_RESOLUTION} px ({SCORER_RESOLUTION // 8}x{SCORER_RESOLUTION // 8} "
        f"latents) with the SD VAE | " + saved(lambda b: (decode(b) - decode(sr)) * samples) + " |")
    add(f"| (a) TAESD decoder at the training resolution | "
        + saved(lambda b: (decode(b) - b["taesd_forward"] - b["taesd_backward"]) * samples) + " |")
    add(f"| (a) TAESD decoder at {SCORER_RESOLUTION} px | "
        + saved(lambda b: (decode(b) - sr["taesd_forward"] - sr["taesd_backward"]) * samples) + " |")
    add(f"| (b) cache VAE latents ({args.train_images:,} images, once) and text features (once per caption) | "
        + saved(lambda b: (edge_sample_flops(b["parts"]) - edge_sample_flops(b["parts"], cached=True)) * samples
                - cache_flops(b["parts"], args.train_images, args.pairs)) + " |")
    add("| (c) gradient checkpointing of UNet + VAE decoder (recomputes forwards; saves memory) | "
        + saved(lambda b: (b["edge_step"] - b["edge_step_checkpointed"]) * samples) + " |")
    fast = sampling_flops(by[args.sample_resolution]["parts"].unet_forward, counts["text_encoder"],
                          by[args.sample_resolution]["parts"].vae_decode_forward, args.num_images,
                          args.fast_steps, args.unet_evals_per_step)
    add(f"| (d) DPM-Solver++ {args.fast_steps} steps instead of {args.steps} for sampling | "
        + saved(lambda b: sample_flops - fast) + " |")
    add("| (e) DiffFit instead of full fine-tuning (weight gradients of the UNet's matmuls/convs) | "
        + saved(lambda b: (b["unet_backward_full"] - b["parts"].unet_backward) * samples) + " |")
    add("| (e) ... as a share of the full UNet backward | " + " | ".join(
        f"{100 * (by[r]['unet_backward_full'] - by[r]['parts'].unet_backward) / by[r]['unet_backward_full']:.0f}%"
        for r in res_list) + " |")
    best = {}
    for r in res_list:
        b = by[r]
        p = b["parts"]
        tiny = PartFlops(**{**vars(p), "vae_decode_forward": sr["taesd_forward"],
                            "vae_decode_backward": sr["taesd_backward"]})
        best[r] = (training_flops(edge_sample_flops(tiny, cached=True), args.pairs, args.epochs, loss_step,
                                  args.batch_size) + cache_flops(p, args.train_images, args.pairs) + fast)
    add(f"| EDGE total with (a) TAESD at {SCORER_RESOLUTION} px + (b) + (d) | " + " | ".join(
        f"{_h(hours(best[r]))} h ({edge_total[r] / best[r]:.1f}x less)" for r in res_list) + " |")
    return lines
