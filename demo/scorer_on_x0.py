"""Does the EDGE scorer recognise the one-step x0 estimates its loss is computed on? Per timestep.

EDGE's contrastive term scores vae.decode(x0^) where x0^ is the one-step estimate of the clean latent from
z_t (utils.method.edge_step). Its gradient can only carry the caption where the scorer tells the estimate's
caption from others. This measures, for real test pairs, the share of images whose own caption a retrieval
model ranks first among the captions of a block of 100 (demo.prompt_rank), for: the real images, their VAE
round trip, and x0^ of a generator at each timestep of a grid (same noise seed for every t). Run it with the
EDGE scorer and with an independent model (another seed) to see both what EDGE follows and what it should.

Usage:
    python -m demo.scorer_on_x0 --model assets/demo_sd --data data/procedural32 \
        --scorer retrieval:outputs/ablation/scorer/seed_0 --judge retrieval:outputs/ablation/scorer/seed_1 \
        --output outputs/scorer_on_x0.md
"""
import argparse
import sys

import torch

from utils.common.errors import run_cli

DEFAULT_TIMESTEPS = (0, 100, 250, 500, 750, 900, 999)


def parse_args(argv=None):
    """Flags of the measurement."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers pipeline folder of the generator")
    p.add_argument("--data", required=True, help="annotation folder (procedural output or Karpathy JSON folder)")
    p.add_argument("--dataset", default="procedural", help="registered data set name of --data")
    p.add_argument("--images", default=None, help="image root (Karpathy data)")
    p.add_argument("--scorer", required=True, help="the EDGE scorer, e.g. retrieval:<folder>")
    p.add_argument("--judge", default=None, help="an independent model (not the scorer), same spec format")
    p.add_argument("--timesteps", type=int, nargs="+", default=list(DEFAULT_TIMESTEPS))
    p.add_argument("--n", type=int, default=300, help="real test pairs (blocks of 100)")
    p.add_argument("--x0_clamp", type=float, default=3.0, help="as the EDGE recipe's x0_clamp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="Markdown file for the table (default: print only)")
    return p.parse_args(argv)


@torch.no_grad()
def x0_estimates(components, images, prompts, t: int, resolution: int, seed: int = 0, clamp: float = None,
                 batch_size: int = 64) -> list:
    """PIL decodes of the one-step x0 estimate from z_t (posterior mean latents, noise from `seed`)."""
    from PIL import Image

    from demo.prompt_following import to_tensor
    from utils.method.denoise import predicted_x0
    from utils.method.vae_latents import scale_latents, unscale_latents
    from utils.models.sd_models import encode_prompts

    unet, vae, sched = components.unet, components.vae, components.noise_scheduler
    out = []
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(images), batch_size):
        x = to_tensor(images[i:i + batch_size], resolution)
        z0 = scale_latents(vae, vae.encode(x).latent_dist.mode())
        noise = torch.randn(z0.shape, generator=gen)
        ts = torch.full((len(x),), t, dtype=torch.long)
        zt = sched.add_noise(z0, noise, ts)
        cond = encode_prompts(components.text_encoder, components.tokenizer, prompts[i:i + batch_size])
        x0 = predicted_x0(sched, unet(zt, ts, cond).sample, zt, ts, clamp=clamp)
        y = vae.decode(unscale_latents(vae, x0)).sample.float().clamp(-1, 1)
        arrays = ((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        out += [Image.fromarray(a, "RGB") for a in arrays]
    return out


def measure(args) -> dict:
    """{row: {model name: prompt_rank_share}} for real, VAE round trip and x0^ at each timestep."""
    from demo.measure_prompt_following import vae_round_trip
    from demo.prompt_rank import prompt_rank_share, real_test_items
    from utils.models.scorers import build_scorer
    from utils.models.sd_models import load_sd_components

    comps = load_sd_components(args.model)
    for m in (comps.unet, comps.vae, comps.text_encoder):
        m.float().eval()  # the shipped model is stored in fp16
    resolution = int(comps.unet.config.sample_size) * 2 ** (len(comps.vae.config.block_out_channels) - 1)
    images, prompts = real_test_items(args.dataset, args.data, args.images, n=args.n)
    rows = {"real test images": images, "real, VAE round trip": vae_round_trip(comps.vae, images, resolution)}
    for t in args.timesteps:
        rows[f"x0 estimate at t = {t}"] = x0_estimates(comps, images, prompts, t, resolution, args.seed,
                                                       args.x0_clamp)
    models = {"EDGE scorer": args.scorer, **({"independent model": args.judge} if args.judge else {})}
    result = {}
    for name, spec in models.items():
        scorer = build_scorer(spec)
        size = int(scorer.image_size[0])
        for row, ims in rows.items():
            result.setdefault(row, {})[name] = prompt_rank_share(scorer, ims, prompts, size)
    return result


def markdown(args, result: dict) -> str:
    """The table: one row per image kind, one column per model (share % [95 % CI] of own caption first)."""
    from demo.prompt_following import format_share

    names = list(next(iter(result.values())))
    n = next(iter(next(iter(result.values())).values()))["n"]
    L = [f"# Own caption ranked first among 100: real images, VAE round trip, one-step x0 estimates", "",
         f"Generator {args.model}; {n} real test pairs of {args.data}; noise seed {args.seed}; x0 clamp "
         f"{args.x0_clamp}; scorer {args.scorer}" + (f"; independent model {args.judge}" if args.judge else "")
         + ". Share % [95 % Wilson interval]; chance 1 %.", "",
         "| images | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    L += [f"| {row} | " + " | ".join(format_share(v[m]) for m in names) + " |" for row, v in result.items()]
    return "\n".join(L) + "\n"


def main(args) -> str:
    """Measure, print and (with --output) write the table."""
    from utils.common.atomic_io import atomic_write_text

    text = markdown(args, measure(args))
    if args.output:
        atomic_write_text(args.output, text)
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
