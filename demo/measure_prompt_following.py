"""Measure prompt following of distilled sets: does each image show the colour and shape its prompt names?

An attribute classifier is trained on the real procedural training images (demo/prompt_following.py),
then reads every image of each set; the prompt of an image is its first caption (the sampling prompt).
A "real images" row (held-out test images with their first caption) shows the classifier's own ceiling.

Usage:
    python -m demo.measure_prompt_following --data data/procedural32 --set outputs/demo/sets/sd_before_edge \\
        --set outputs/demo/sets/edge_cpi1 [--real 100] [--json results.json]
"""
import argparse
import json
import sys
from pathlib import Path

from dataset.images import load_image
from utils.atomic_io import atomic_write_json
from utils.config import parse_args_with_recipe
from utils.errors import fail, run_cli


def parse_args(argv=None):
    """Flags: the procedural data folder, the sets to measure, the size of the real-image row."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="procedural data folder (with spec.json and attributes)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="distilled-set folder (repeatable)")
    p.add_argument("--name", dest="names", action="append", default=None,
                   help="row name per --set (default: the folder name)")
    p.add_argument("--real", type=int, default=100, help="held-out real images in the reference row (0: none)")
    p.add_argument("--classifier_epochs", type=int, default=4)
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

    data_dir = Path(data_dir)
    ann = data_dir / "annotations" / "procedural_test.json"
    try:
        entries = json.loads(ann.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise fail(f"cannot read the procedural test annotations {ann}: {e}")
    attributes = read_attributes(data_dir)
    images, prompts = [], []
    for i, e in enumerate(entries):
        if len(images) >= n:
            break
        if not isinstance(e, dict) or "image" not in e or not e.get("caption"):
            raise fail(f"{ann}: entry {i} needs 'image' and 'caption'")
        if len(attributes.get(e["image"], {}).get("objects", [])) != 1:
            continue
        caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        images.append(load_image(data_dir / e["image"]))
        prompts.append(caps[0])
    return images, prompts


def set_items(folder) -> tuple:
    """(PIL images, prompts) of a distilled set; the prompt is each image's first caption."""
    from dataset.distilled import read_distilled_set

    ds = read_distilled_set(folder)
    return [load_image(Path(folder) / r["image"]) for r in ds.records], [r["captions"][0] for r in ds.records]


def measure(data_dir, sets, names=None, real: int = 100, classifier_epochs: int = 4, seed: int = 0) -> list:
    """Rows {"name", "colour", "shape", "both", "n", "skipped"} (percentages) for the real row and each set."""
    from demo.prompt_following import prompt_following, train_attribute_classifier

    model, spec = train_attribute_classifier(data_dir, epochs=classifier_epochs, seed=seed)
    rows = []
    if real:
        images, prompts = real_test_items(data_dir, real)
        rows.append({"name": "real test images", **prompt_following(model, spec, images, prompts)})
    for i, folder in enumerate(sets):
        images, prompts = set_items(folder)
        rows.append({"name": names[i] if names else Path(folder).name, **prompt_following(model, spec, images, prompts)})
    return rows


def markdown_table(rows) -> str:
    """The rows as a Markdown table (percentages with one decimal)."""
    lines = ["| images | colour % | shape % | both % | n |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['colour']:.1f} | {r['shape']:.1f} | {r['both']:.1f} | {r['n']} |")
    return "\n".join(lines)


def main(args) -> list:
    """Measure, print the table, optionally write JSON; returns the rows."""
    rows = measure(args.data, args.sets, args.names, args.real, args.classifier_epochs, args.seed)
    print(markdown_table(rows))
    if args.json:
        atomic_write_json(args.json, {"data": str(args.data), "rows": rows})
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
