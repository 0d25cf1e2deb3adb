"""How many of a training set's pairs carry a corrupted caption of a `--caption_noise` procedural data set.

A generated set's pairs are its prompts with the real train images they were drawn from (its real twin); the
random baseline's are the pairs `evaluation --baseline random` draws. A pair is noisy when its caption is one
of the captions `dataset.procedural --caption_noise` corrupted for that image
(annotations/procedural_noisy_captions.json). The share comes with its 95 % Wilson interval.

Usage:
    python -m demo.noisy_captions --data data/noisy32 --set outputs/ablation_noisy/sets/before
    python -m demo.noisy_captions --data data/noisy32 --random 100 [--seed 0]
"""
import argparse
import sys
from types import SimpleNamespace

from dataset.procedural import read_noisy_captions
from demo.prompt_following import share
from utils.common.errors import run_cli


def noisy_pair_flags(groups, noisy_captions: dict) -> list:
    """One flag per (image, caption) pair of `groups` ([{"image", "captions"}]): True when the caption is one of
    the corrupted captions `noisy_captions` ({image: {caption index: caption}}) lists for that image."""
    flags = []
    for g in groups:
        corrupted = set(noisy_captions.get(g["image"], {}).values())
        flags += [c in corrupted for c in g["captions"]]
    return flags


def pair_groups(data_dir, set_dir=None, random_n=None, seed: int = 0) -> list:
    """The (real image, caption) groups of a generated set's real twin, or of the random baseline."""
    from evaluation.data import train_groups

    args = SimpleNamespace(distill_dir=set_dir, real_twin=set_dir is not None, dataset="procedural",
                           ann_root=str(data_dir), image_root=None, baseline=None if set_dir else "random",
                           n=random_n, seed=seed, captions_per_image=1)
    return train_groups(args)[0]


def parse_args(argv=None):
    """Flags: the data folder and either a generated set or the random baseline's size."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="procedural data folder made with --caption_noise")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--set", default=None, help="generated set whose prompts were drawn from --data's captions")
    g.add_argument("--random", type=int, default=None, help="the random baseline of this many pairs")
    p.add_argument("--seed", type=int, default=0, help="the random baseline's seed (evaluation's --seed)")
    return p.parse_args(argv)


def main(args) -> dict:
    """Print and return the noisy share of the pairs."""
    noisy = read_noisy_captions(args.data)
    flags = noisy_pair_flags(pair_groups(args.data, args.set, args.random, args.seed), noisy)
    result = share(flags)
    what = args.set or f"{args.random} random real pairs (seed {args.seed})"
    print(f"{what}: {result['k']} of {result['n']} pairs noisy = {result['share']:.1f} % "
          f"[{result['lo']:.1f}, {result['hi']:.1f}]")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
