"""Measure prompt following per caption attribute: real images, the VAE's round trip, and sampled sets.

An attribute classifier is trained on the real procedural training images (demo/prompt_following.py),
then reads colour, shape, size, position and background of every image; the prompt of an image is its
first caption (the sampling prompt). Rows: held-out real test images (the classifier's own ceiling),
the same images encoded and decoded by a model's VAE (the ceiling any latent generator can reach), and
each sampled set. Each cell is a share with its 95 % Wilson interval.

Usage:
    python -m demo.measure_prompt_following --data data/procedural32 --vae_model assets/demo_sd \
        --set outputs/demo/sets/sd_before_edge --set outputs/demo/sets/edge_cpi1 [--real 300] [--json r.json]
"""
import argparse
import sys
from pathlib import Path

import torch

from dataset.images import load_image
from utils.common.atomic_io import atomic_write_json
from utils.common.config import parse_args_with_recipe
from utils.common.errors import fail, run_cli


def parse_args(argv=None):
    """Flags: the procedural data folder, the sets to measure, the size of the real-image row."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="procedural data folder (with spec.json and attributes)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="distilled-set folder (repeatable)")
    p.add_argument("--name", dest="names", action="append", default=None,
                   help="row name per --set (default: the folder name)")
    p.add_argument("--real", type=int, default=300, help="held-out real images in the reference rows (0: none)")
    p.add_argument("--vae_model", default=None,
                   help="SD folder whose VAE round trip (encode -> decode) of the real images is a row")
    p.add_argument("--classifier_epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parse_args_with_recipe(p, argv)
    if args.names is not None and len(args.names) != len(args.sets):
        raise fail(f"give one --name per --set ({len(args.sets)} sets, {len(args.names)} names)")
    if args.real < 0:
        raise fail(f"--real must be >= 0, got {args.real}")
    return args


def real_test_items(data_dir, n: int) -> tuple:
    """(PIL images, prompts) of the first `n` single-object test images, each with its first caption."""
    from dataset.procedural import read_attributes
    from demo.prompt_rank import real_test_items as test_items

    attributes = read_attributes(data_dir)
    return test_items("procedural", data_dir, n=n,
                      keep=lambda e: len(attributes.get(e["image"], {}).get("objects", [])) == 1)


def set_items(folder) -> tuple:
    """(PIL images, prompts) of a distilled set; the prompt is each image's first caption."""
    from dataset.distilled import read_distilled_set

    ds = read_distilled_set(folder)
    return [load_image(Path(folder) / r["image"]) for r in ds.records], [r["captions"][0] for r in ds.records]


@torch.no_grad()
def vae_round_trip(vae, images, resolution: int, batch_size: int = 64) -> list:
    """PIL images encoded to the posterior mean and decoded back by `vae` (the latent generator's ceiling)."""
    from PIL import Image

    from demo.prompt_following import to_tensor

    out = []
    for i in range(0, len(images), batch_size):
        x = to_tensor(images[i:i + batch_size], resolution)
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        arrays = ((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        out += [Image.fromarray(a, "RGB") for a in arrays]
    return out


def measure(data_dir, sets: dict, real: int = 300, classifier_epochs: int = 6, seed: int = 0,
            vae_model=None) -> dict:
    """{row name: prompt_following result} for the real rows and each set of `sets` ({row name: folder})."""
    from demo.prompt_following import prompt_following, train_attribute_classifier

    model, spec = train_attribute_classifier(data_dir, epochs=classifier_epochs, seed=seed)
    rows = {}
    if real:
        images, prompts = real_test_items(data_dir, real)
        rows["real test images"] = prompt_following(model, spec, images, prompts)
        if vae_model:
            from utils.models.sd_models import load_sd_components

            vae = load_sd_components(vae_model).vae.float().eval()
            rows["real, VAE round trip"] = prompt_following(
                model, spec, vae_round_trip(vae, images, spec.resolution), prompts)
    for name, folder in sets.items():
        images, prompts = set_items(folder)
        rows[name] = prompt_following(model, spec, images, prompts)
    return rows


def main(args) -> dict:
    """Measure, print the table, optionally write JSON; returns the rows."""
    from demo.prompt_following import markdown_table

    names = args.names or [Path(f).name for f in args.sets]
    rows = measure(args.data, dict(zip(names, args.sets)), args.real, args.classifier_epochs, args.seed,
                   args.vae_model)
    print(f"prompt following (classifier seed {args.seed}, {args.classifier_epochs} epochs; share % [95 % CI]):")
    print(markdown_table(rows))
    if args.json:
        atomic_write_json(args.json, {"data": str(args.data), "seed": args.seed, "rows": rows})
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
