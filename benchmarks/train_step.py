"""Cost of one EDGE training step relative to one plain diffusion-loss step (same UNet, same batch).

EDGE step: UNet forward on the noised latent -> x0 estimate -> VAE decode with gradients -> scorer
image tower -> contrastive + diversity losses -> backward -> optimizer step. Plain step: UNet
forward -> noise-prediction MSE -> backward -> optimizer step. Each variant runs in its own
subprocess, so memory numbers do not mix.

Time: median wall time of --steps steps after one warm-up step.
Memory: on CUDA, torch.cuda.max_memory_allocated over the steps (weights included). On CPU, the
rise of the process's peak resident set size (VmHWM, reset through /proc/self/clear_refs just
before the first step) above its resident size after loading, i.e. the extra memory the steps'
activations, gradients and optimizer state need (weights excluded); allocator caching makes it
coarse, so read ratios, not bytes.

Usage:
  python benchmarks/train_step.py                       # tiny random model on CPU
  python benchmarks/train_step.py --device cuda --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --scorer open_clip:ViT-B-32/openai --resolution 512 --batch_size 8 --trainable difffit
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file from anywhere

from utils.config import parse_args_with_recipe  # noqa: E402


def parse_args(argv=None):
    """Flags of the benchmark."""
    p = argparse.ArgumentParser(description="EDGE step vs plain diffusion step: time and memory ratios.")
    p.add_argument("--model", default=None, help="SD folder or hub id (default: a tiny random model)")
    p.add_argument("--scorer", default=None, help="scorer spec (default: a tiny random transformers CLIP)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--trainable", choices=("difffit", "lora", "full"), default="difffit")
    p.add_argument("--lambda_mse", type=float, default=0.0, help="MSE weight inside the EDGE step")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variant", choices=("plain", "edge"), default=None, help=argparse.SUPPRESS)
    return parse_args_with_recipe(p, argv)


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
    import torch

    from utils.scorers import build_scorer
    from utils.sd_models import encode_prompts, load_sd_components
    from utils.seeding import set_cpu_threads
    from utils.trainable_params import configure_trainable
    from utils.training import EDGELossConfig, edge_losses

    set_cpu_threads(args.threads)
    device = torch.device(args.device)
    comps = load_sd_components(args.model)
    for m in (comps.vae, comps.text_encoder):
        m.requires_grad_(False)
        m.to(device).eval()
    params = configure_trainable(comps.unet, args.trainable)
    comps.unet.to(device).train()
    optimizer = torch.optim.SGD(params, lr=1e-3)
    edge = args.variant == "edge"
    cfg = EDGELossConfig(lambda_contrastive=1.0 if edge else 0.0, lambda_diversity=1.0 if edge else 0.0,
                         lambda_mse=args.lambda_mse if edge else 1.0)
    cfg.t_max = comps.noise_scheduler.config.num_train_timesteps - 1
    scorer = build_scorer(args.scorer, device) if edge else None
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=g) * 2 - 1).to(device)
    captions = [f"a photo number {i}" for i in range(args.batch_size)]
    with torch.no_grad():
        hidden = encode_prompts(comps.text_encoder, comps.tokenizer, captions, device)

    def step(seed):
        out = edge_losses(comps.unet, comps.vae, comps.noise_scheduler, scorer, pixels, captions, hidden, cfg,
                          torch.Generator().manual_seed(seed))
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


def main(args):
    """Run both variants in subprocesses and print the ratios."""
    if args.variant:
        print(json.dumps(run_variant(args)))
        return None
    tmp = None
    if args.model is None or args.scorer is None:
        tmp = tempfile.TemporaryDirectory()
        if args.model is None:
            from utils.sd_models import build_tiny_sd

            args.model = str(build_tiny_sd(Path(tmp.name) / "sd", resolution=args.resolution))
        if args.scorer is None:
            from utils.scorers import build_tiny_hf_clip

            args.scorer = "hf_clip:" + str(build_tiny_hf_clip(Path(tmp.name) / "clip"))
    results = {}
    for variant in ("plain", "edge"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--model", args.model,
               "--scorer", args.scorer, "--device", args.device, "--resolution", str(args.resolution),
               "--batch_size", str(args.batch_size), "--steps", str(args.steps), "--trainable", args.trainable,
               "--lambda_mse", str(args.lambda_mse)] + (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"error: {variant} variant failed: {proc.stderr.strip().splitlines()[-1]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    time_ratio = results["edge"]["median_s"] / results["plain"]["median_s"]
    plain_mem = results["plain"]["peak_extra_bytes"]
    mem_ratio = results["edge"]["peak_extra_bytes"] / plain_mem if plain_mem else float("nan")
    what = "CUDA peak allocated" if args.device.startswith("cuda") else "CPU peak-RSS rise during the steps"
    print(f"model={args.model} scorer={args.scorer} device={args.device} batch={args.batch_size} "
          f"resolution={args.resolution} trainable={args.trainable}")
    print(f"EDGE step / plain diffusion step: time x{time_ratio:.2f}, memory x{mem_ratio:.2f} ({what})")
    if tmp is not None:
        tmp.cleanup()
    return {"time_ratio": time_ratio, "memory_ratio": mem_ratio, **results}


if __name__ == "__main__":
    main(parse_args())
