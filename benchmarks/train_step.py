"""Cost of one EDGE training step, with each speed-up, relative to one plain diffusion-loss step.

Variants (same UNet, same batch; each runs in its own subprocess so memory numbers do not mix):
  plain                MSE step as diffusers' train_text_to_image: VAE encode -> UNet -> MSE -> backward -> SGD
  plain_cached         the same from cached VAE posteriors (no encode)
  edge_full            EDGE step: encode -> UNet -> x0 -> full VAE decode with gradients -> scorer -> losses
  edge_reduced         ... decoding a latent resized to the scorer's input size (--scorer_decode reduced)
  edge_tiny            ... decoding with an AutoencoderTiny (--scorer_decode tiny; random weights unless --tiny_vae)
  edge_cached          edge_full from cached VAE posteriors (--cache_latents)
  edge_reduced_cached  edge_reduced + cached latents
  edge_tiny_cached     edge_tiny + cached latents
  edge_full_ckpt       edge_full + gradient checkpointing of the UNet and the VAE decoder
  edge_reduced_ckpt    edge_reduced + gradient checkpointing
  edge_full_cl         edge_full in channels-last memory format

Time: median wall time of --steps steps after one warm-up step, per variant and round; rounds are
interleaved (the variant order rotates each round) and the best (lowest) round median is reported,
with the median over rounds beside it. Memory: on CUDA, torch.cuda.max_memory_allocated over the
steps (weights included). On CPU, the rise of the process's peak resident set size (VmHWM, reset
through /proc/self/clear_refs just before the first step) above its resident size after loading:
the extra memory of activations, gradients and optimizer state (weights excluded); allocator
caching makes it coarse, so read ratios, not bytes; the smallest value over rounds is reported.

Default model (no --model): a tiny random Stable Diffusion at 128 px with a 4x-downsampling VAE
(vae_channels 32 64 64 -> 32x32 latents), UNet block_out_channels (48, 96), and a tiny random
transformers CLIP scorer at 56 px: 56/128 is SD's 224/512, so "reduced" decodes 14x14 of the 32x32
latents as SD decodes 28x28 of 64x64. The UNet width makes the counted FLOPs per sample of VAE
encode : UNet forward+backward (DiffFit) : decode forward+backward 0.62 : 1 : 3.31, against SD v1.5's
0.65 : 1 : 2.93 at 512 px (benchmarks/cost_model.py), so an EDGE step counts 3.04x a plain step's
FLOPs here and 2.78x in SD. The tiny AutoencoderTiny has TAESD's layout (blocks 3,3,1) at 16
channels.

Usage:
  python -m benchmarks.train_step                                   # tiny model on CPU, all variants
  python -m benchmarks.train_step --variants plain edge_full edge_reduced --rounds 5
  python -m benchmarks.train_step --device cuda --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --scorer open_clip:ViT-B-32/openai --tiny_vae taesd/ --resolution 512 --batch_size 8 --mixed_precision fp16
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from utils.common.config import parse_args_with_recipe

ROOT = Path(__file__).resolve().parent.parent

# name -> (EDGE losses, scorer decode, cached latents, gradient checkpointing, channels-last)
VARIANTS = {
    "plain": (False, "full", False, False, False),
    "plain_cached": (False, "full", True, False, False),
    "edge_full": (True, "full", False, False, False),
    "edge_reduced": (True, "reduced", False, False, False),
    "edge_tiny": (True, "tiny", False, False, False),
    "edge_cached": (True, "full", True, False, False),
    "edge_reduced_cached": (True, "reduced", True, False, False),
    "edge_tiny_cached": (True, "tiny", True, False, False),
    "edge_full_ckpt": (True, "full", False, True, False),
    "edge_reduced_ckpt": (True, "reduced", False, True, False),
    "edge_full_cl": (True, "full", False, False, True),
}


def parse_args(argv=None):
    """Flags of the benchmark."""
    p = argparse.ArgumentParser(description="EDGE step (with each speed-up) vs plain diffusion step: time and "
                                            "memory ratios.")
    p.add_argument("--model", default=None, help="SD folder or hub id (default: a tiny random 128 px model)")
    p.add_argument("--scorer", default=None, help="scorer spec (default: a tiny random transformers CLIP at 56 px)")
    p.add_argument("--tiny_vae", default=None, help="AutoencoderTiny folder (default with the tiny model: a random "
                                                     "one; with --model and no --tiny_vae the tiny variants are "
                                                     "skipped)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--scorer_size", type=int, default=56, help="input size of the default tiny scorer")
    p.add_argument("--unet_channels", type=int, nargs="+", default=[48, 96],
                   help="block_out_channels of the default tiny UNet")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every variant")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    p.add_argument("--trainable", choices=("difffit", "lora", "full"), default="difffit")
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no",
                   help="dtype of the frozen VAE/scorer and autocast of the UNet (trainable weights stay fp32)")
    p.add_argument("--lambda_mse", type=float, default=0.0, help="MSE weight inside the EDGE step")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json_out", default=None, help="also write the results to this JSON file")
    p.add_argument("--variant", choices=tuple(VARIANTS), default=None, help=argparse.SUPPRESS)
    args = parse_args_with_recipe(p, argv)
    if args.steps < 1 or args.rounds < 1 or args.batch_size < 2:
        from utils.common.errors import fail

        raise fail("--steps and --rounds must be at least 1 and --batch_size at least 2")
    return args


def _status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_variant(args) -> dict:
    """Measure one variant in this process -> {"median_s", "peak_extra_bytes"}."""
    import contextlib

    import torch

    from utils.common.precision import weight_dtype
    from utils.common.seeding import set_cpu_threads
    from utils.method.edge_step import EDGELossConfig, edge_losses
    from utils.method.vae_latents import posterior_mean_std
    from utils.models.sd_models import encode_prompts
    from utils.stages.train_setup import prepare_models

    edge, decode, cached, ckpt, channels_last = VARIANTS[args.variant]
    set_cpu_threads(args.threads)
    device = torch.device(args.device)
    dtype = weight_dtype(args.mixed_precision)
    cfg = EDGELossConfig(lambda_contrastive=1.0 if edge else 0.0, lambda_diversity=1.0 if edge else 0.0,
                         lambda_mse=args.lambda_mse if edge else 1.0)
    # The training stage's own model setup (load, freeze, trainable set, scorer, decoder, memory options).
    setup = argparse.Namespace(pretrained_model_name_or_path=args.model, t_min=0, t_max=None, scorer=args.scorer,
                               scorer_decode=decode, tiny_vae=args.tiny_vae if decode == "tiny" else None,
                               trainable=args.trainable, lora_rank=4, gradient_checkpointing=ckpt,
                               channels_last=channels_last, compile=False)
    m = prepare_models(setup, cfg, device, dtype)
    m.unet.train()
    optimizer = torch.optim.SGD(m.params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=g) * 2 - 1).to(device)
    captions = [f"a photo number {i}" for i in range(args.batch_size)]
    with torch.no_grad():
        hidden = encode_prompts(m.text_encoder, m.tokenizer, captions, device)
    latent_dist = posterior_mean_std(m.vae, pixels) if cached else None  # encoded once, outside the timing

    def step(seed):
        with torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext():
            out = edge_losses(m.unet, m.vae, m.noise_scheduler, m.scorer, None if cached else pixels,
                              captions, hidden, cfg, torch.Generator().manual_seed(seed), dtype,
                              decoder=m.decoder, latent_dist=latent_dist)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset = _reset_peak_rss()
    base_rss = _status_bytes("VmRSS")
    step(0)  # warm-up: not timed, but its allocations count for memory (later steps reuse them)
    sync()
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        step(i + 1)
        sync()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        hwm = _status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = max(0, hwm - base_rss)
    return {"median_s": statistics.median(times), "peak_extra_bytes": peak}


def measure_decode_errors(args) -> dict:
    """decode_error of each cheap decode against the full decode, on the encoded benchmark images."""
    import torch

    from utils.common.seeding import set_cpu_threads
    from utils.method.vae_latents import vae_encode
    from utils.models.cheap_decode import build_scorer_decoder, decode_error
    from utils.models.scorers import build_scorer
    from utils.models.sd_models import load_sd_components

    set_cpu_threads(args.threads)
    device = torch.device(args.device)
    comps = load_sd_components(args.model)
    vae = comps.vae.to(device).eval()
    scorer = build_scorer(args.scorer, device)
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=g) * 2 - 1).to(device)
    with torch.no_grad():
        latents = vae_encode(vae, pixels, g)
    modes = ["reduced"] + (["tiny"] if args.tiny_vae else [])
    return {m: decode_error(build_scorer_decoder(m, vae, scorer.image_size, args.tiny_vae if m == "tiny" else None,
                                                 device), latents, scorer) for m in modes}


def _build_default_models(args, tmp: Path) -> None:
    """Fill --model, --scorer and --tiny_vae with tiny random models of SD's proportions."""
    from utils.models.tiny import build_tiny_autoencoder
    from utils.models.tiny import build_tiny_hf_clip
    from utils.models.tiny import build_tiny_sd

    if args.model is None:
        args.model = str(build_tiny_sd(tmp / "sd", resolution=args.resolution, vae_channels=(32, 64, 64),
                                       unet_channels=tuple(args.unet_channels)))
        if args.tiny_vae is None:  # TAESD's layout at 16 channels, 2 upsamplings for the 4x VAE
            args.tiny_vae = str(build_tiny_autoencoder(tmp / "taesd", 4, upsamplings=2, channels=16,
                                                       taesd_layout=True))
    if args.scorer is None:
        args.scorer = "hf_clip:" + str(build_tiny_hf_clip(tmp / "clip", image_size=args.scorer_size, patch_size=8))


def _run_subprocess(args, variant: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--variant", variant, "--model", args.model,
           "--scorer", args.scorer, "--device", args.device, "--resolution", str(args.resolution),
           "--batch_size", str(args.batch_size), "--steps", str(args.steps), "--trainable", args.trainable,
           "--mixed_precision", args.mixed_precision, "--lambda_mse", str(args.lambda_mse)]
    cmd += (["--threads", str(args.threads)] if args.threads else []) + (
        ["--tiny_vae", args.tiny_vae] if VARIANTS[variant][1] == "tiny" else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        sys.exit(f"error: variant {variant} failed: {lines[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(args):
    """Run the variants in interleaved rounds of subprocesses and print time and memory ratios to plain."""
    if args.variant:
        print(json.dumps(run_variant(args)))
        return None
    tmp = tempfile.TemporaryDirectory()
    default_model = args.model is None
    _build_default_models(args, Path(tmp.name))
    variants = [v for v in args.variants if args.tiny_vae or VARIANTS[v][1] != "tiny"]
    skipped = [v for v in args.variants if v not in variants]
    for base in ("plain", "plain_cached"):
        if base not in variants:
            variants.insert(0, base)
    runs = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            runs[v].append(_run_subprocess(args, v))
            print(f"round {r + 1}/{args.rounds} {v}: {runs[v][-1]['median_s']:.3f} s, "
                  f"{runs[v][-1]['peak_extra_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    errors = measure_decode_errors(args)
    tmp.cleanup()
    summary = {}
    for v, rs in runs.items():
        summary[v] = {"best_s": min(r["median_s"] for r in rs),
                      "median_s": statistics.median(r["median_s"] for r in rs),
                      "mem_bytes": min(r["peak_extra_bytes"] for r in rs),
                      # paired: this variant's time over plain's in the same round, median over rounds
                      "time_ratio_paired": statistics.median(r["median_s"] / p["median_s"]
                                                             for r, p in zip(rs, runs["plain"]))}
    what = "CUDA peak allocated" if args.device.startswith("cuda") else "CPU peak-RSS rise during the steps"
    print(f"model={args.model if not args.model.startswith(tempfile.gettempdir()) else 'tiny 128px'} "
          f"scorer={'tiny' if args.scorer.startswith('hf_clip:' + tempfile.gettempdir()) else args.scorer} "
          f"device={args.device} batch={args.batch_size} resolution={args.resolution} trainable={args.trainable} "
          f"mixed_precision={args.mixed_precision} steps={args.steps} rounds={args.rounds}")
    print(f"time: per round, the median of {args.steps} steps; 'paired' = median over {args.rounds} interleaved "
          f"rounds of (variant / plain in the same round); 'best' = best round / best plain round; memory: {what}, "
          f"smallest over rounds")
    print("| variant | step s (best) | / plain, paired | / plain, best | / plain_cached, best | memory MiB "
          "| / plain (memory) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    p, pc = summary["plain"], summary["plain_cached"]
    for v, s in summary.items():
        s["time_ratio"] = s["best_s"] / p["best_s"]
        s["time_ratio_median"] = s["median_s"] / p["median_s"]
        s["time_ratio_vs_cached"] = s["best_s"] / pc["best_s"]
        s["memory_ratio"] = s["mem_bytes"] / p["mem_bytes"] if p["mem_bytes"] else float("nan")
        print(f"| {v} | {s['best_s']:.3f} | {s['time_ratio_paired']:.2f}x | {s['time_ratio']:.2f}x | "
              f"{s['time_ratio_vs_cached']:.2f}x | {s['mem_bytes'] / 2**20:.0f} | {s['memory_ratio']:.2f}x |")
    if skipped:
        print(f"skipped (no --tiny_vae): {', '.join(skipped)}")
    for mode, e in errors.items():
        print(f"decode error, {mode} vs full (at the scorer's input size): pixel RMSE {e['pixel_rmse']:.4f} "
              f"({e['pixel_rel']:.1%} of the full decode's RMS), scorer feature cosine {e['feature_cos']:.4f}"
              + (" [random weights: not a quality measure]" if default_model else ""))
    if args.json_out:
        from utils.common.atomic_io import atomic_write_json

        atomic_write_json(args.json_out, {"args": vars(args), "summary": summary, "decode_error": errors})
    return summary


if __name__ == "__main__":
    main(parse_args())
