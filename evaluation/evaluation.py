"""Stage 4: train the protocol's retrieval model on a distilled (or baseline) set, report recalls on a real test split.

The model (MTT-VL / LoRS / EDGE): a trainable image encoder (NFNet-L0), a frozen text encoder
(bert-base-uncased CLS) with a trained projection head, temperature 0.07, symmetric InfoNCE, images
normalised with CLIP's mean/std. `--protocol lors` (default): SGD lr 0.1, momentum 0.9, weight decay 5e-4,
x0.1 at mid-training, batch 128, one random caption per image per epoch, no augmentation.
`--protocol edge` (the public EDGE evaluator, for comparison with the EDGE paper's tables): one pair per
caption, RandomResizedCrop + flip + RandAugment on training images, SGD lr 0.1 without momentum or weight
decay, constant lr, batch 32, 224 px. 100 epochs, evaluation every 5 (see evaluation/protocol.py).
Recalls follow BLIP's itm_eval. The reported epoch is the last one by default; `--selection best_val`
picks it on the val split and `--selection best_test` applies LoRS's optimistic rule (best on test).

Usage:
    python -m evaluation.evaluation --dataset flickr30k --ann_root data/flickr30k/annotations \
        --image_root data/flickr30k --distill_dir outputs/distilled/flickr_500 --seeds 3
    python -m evaluation.evaluation --dataset procedural --ann_root data/procedural \
        --baseline random --n 100 --image_encoder efficientnet_lite0 --text_encoder minilm --seeds 3 \
        --results_table outputs/eval/results.md
    python -m evaluation.evaluation --dataset flickr30k --ann_root ... --lors_pt lors_flickr_500.pt
"""
import argparse
import os
import re
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python evaluation/evaluation.py` puts this folder first on sys.path, where this file shadows the package
    print("error: run stage 4 as a module from the repository root: python -m evaluation.evaluation ...",
          file=sys.stderr)
    sys.exit(2)

import torch  # noqa: E402

from dataset.registry import DATASETS  # noqa: E402
from evaluation.data import build_train_set, eval_split, native_image_size  # noqa: E402
from evaluation.protocol import PROTOCOLS, apply_protocol_defaults, protocol_preprocess, protocol_settings  # noqa: E402
from evaluation.protocol import help_text as protocol_help  # noqa: E402
from utils.common.config import args_to_dict, parse_args_with_recipe, run_info, save_run_config  # noqa: E402
from utils.common.errors import fail, run_cli  # noqa: E402
from utils.common.seeding import set_cpu_threads  # noqa: E402


def parse_args(argv=None):
    """Command-line flags (a `--config` recipe may set their defaults)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("real data (test split, val split, and the train split for baselines)")
    g.add_argument("--dataset", choices=DATASETS, required=False, default=None)
    g.add_argument("--ann_root", type=str, default=None, help="annotation folder (or the procedural set folder)")
    g.add_argument("--image_root", type=str, default=None, help="image root (default: from the data set layout)")
    g = p.add_argument_group("what to train on (exactly one)")
    g.add_argument("--distill_dir", type=str, default=None, help="a distilled-set folder")
    g.add_argument("--real_twin", action="store_true",
                   help="with --distill_dir: train on the real train images the set's prompts were drawn from "
                        "(its manifest's prompt_source.source_images), keeping the set's captions (with cpi > 1 "
                        "its synthesized ones too): the control that swaps only the generated images for real ones")
    g.add_argument("--lors_pt", type=str, default=None,
                   help="a LoRS .pt set (images + text embeddings of --text_encoder's kind, used as saved)")
    g.add_argument("--baseline", choices=("random", "full"), default=None,
                   help="random: --n distinct real train images, one random caption each; full: all pairs")
    g.add_argument("--n", type=int, default=None, help="size of the random baseline")
    g.add_argument("--captions_per_image", type=int, default=1,
                   help="random baseline: real captions kept per image (the control of a distilled set's --cpi)")
    g.add_argument("--lors_learned_lr", action="store_true",
                   help="with --lors_pt: use the set's learned syn_lr_img/syn_lr_txt as --lr_img/--lr_txt")
    g = p.add_argument_group("model")
    g.add_argument("--image_encoder", type=str, default="nfnet_l0",
                   help="nfnet_l0 | efficientnet_lite0 | timm:<name> | local-dir:<folder> | open_clip:<arch>/<tag>")
    g.add_argument("--text_encoder", type=str, default="bert-base-uncased",
                   help="bert-base-uncased | bert:<folder> | minilm | open_clip:<arch>/<tag> | <folder>")
    g.add_argument("--from_scratch", action="store_true", help="random-init image encoder (no pretrained weights)")
    g.add_argument("--image_size", type=int, default=None,
                   help="input size; default: the encoder's (procedural: the images' own size; LoRS: the set's)")
    g.add_argument("--temperature", type=float, default=0.07)
    g.add_argument("--dropout", type=float, default=0.1)
    g = p.add_argument_group("training (defaults: the --protocol's)")
    g.add_argument("--protocol", choices=PROTOCOLS, default="lors",
                   help="which evaluator to reproduce; it sets the defaults of the flags below. "
                        + " || ".join(protocol_help(name) for name in PROTOCOLS)
                        + " || Public code: ichbill/EDGE bb18c46, silicx/LoRS_Distill 0ad0743.")
    g.add_argument("--no_aug", action="store_true",
                   help="edge protocol: no training augmentation (the public evaluator's --no_aug, "
                        "EDGE dataset/__init__.py L91-92)")
    g.add_argument("--x0_augment", action="store_true",
                   help="also blur and noise half the training images like a one-step x0 estimate (beyond the "
                        "paper: a scorer for EDGE that reads the estimates at high noise; see "
                        "evaluation/x0_augment.py)")
    g.add_argument("--epochs", type=int, default=None, help="lors 100, edge 100")
    g.add_argument("--eval_every", type=int, default=None, help="lors 5, edge 5")
    g.add_argument("--batch_size_train", type=int, default=None, help="lors 128, edge 32")
    g.add_argument("--batch_size_test", type=int, default=None, help="lors 128, edge 32")
    g.add_argument("--lr_img", type=float, default=None, help="lors 0.1, edge 0.1")
    g.add_argument("--lr_txt", type=float, default=None, help="lors 0.1, edge 0.1")
    g.add_argument("--momentum", type=float, default=None, help="lors 0.9, edge 0")
    g.add_argument("--weight_decay", type=float, default=None, help="lors 5e-4, edge 0")
    g.add_argument("--lr_schedule", choices=("step", "constant"), default=None,
                   help="step: x0.1 after half the epochs (lors; edge's --decay); constant (edge)")
    g.add_argument("--seed", type=int, default=0, help="first training seed; also draws the random baseline")
    g.add_argument("--seeds", type=int, default=1, help="number of trainings (seeds seed..seed+N-1)")
    g.add_argument("--selection", choices=("last", "best_val", "best_test"), default="last",
                   help="which evaluated epoch is reported; best_test is LoRS's optimistic rule")
    g.add_argument("--eval_val", action="store_true", help="also evaluate on val (implied by best_val)")
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    g.add_argument("--cpu", action="store_true", help="force the CPU even when a GPU is present")
    g.add_argument("--num_workers", type=int, default=2, help="image decoding workers")
    g.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: cores / processes)")
    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", type=str, default=None, help="default: outputs/eval/<run name>")
    g.add_argument("--overwrite", action="store_true", help="replace an existing results.json in --output_dir")
    g.add_argument("--run_name", type=str, default=None)
    g.add_argument("--results_table", type=str, default=None, help="Markdown table file to append a row to")
    g.add_argument("--save_model_dir", type=str, default=None,
                   help="save the final model of each seed (seed_<s>/ when several) for use as a scorer")
    g.add_argument("--feature_cache_dir", type=str, default=None,
                   help="disk cache of frozen text features (default: $EDGE_CACHE_DIR or ~/.cache/edge/text_features)")
    g.add_argument("--no_feature_cache", action="store_true", help="do not read or write the disk cache")
    g.add_argument("--no_progress", action="store_true", help="hide progress bars")
    from utils.common.config import add_paper_flags  # the public EDGE code's flag names (README)

    args = parse_args_with_recipe(add_paper_flags(p, "evaluation"), argv)
    apply_protocol_defaults(args)
    _validate_args(args)
    return args


def _validate_args(args) -> None:
    sources = [s for s in (args.distill_dir, args.lors_pt, args.baseline) if s]
    if len(sources) != 1:
        raise fail("give exactly one training source: --distill_dir, --lors_pt or --baseline {random,full}")
    if args.real_twin and not args.distill_dir:
        raise fail("--real_twin needs --distill_dir (the set whose prompts' real source images it trains on)")
    if args.dataset is None:
        raise fail("--dataset is required (the real test split to evaluate on)")
    if args.baseline == "random" and (args.n is None or args.n < 2):
        raise fail("--baseline random needs --n (at least 2)")
    if args.n is not None and args.baseline != "random":
        raise fail("--n only applies to --baseline random")
    if args.captions_per_image != 1 and args.baseline != "random":
        raise fail("--captions_per_image only applies to --baseline random")
    if args.captions_per_image < 1:
        raise fail("--captions_per_image must be at least 1")
    if args.lors_learned_lr and not args.lors_pt:
        raise fail("--lors_learned_lr only applies to --lors_pt")
    for name in ("epochs", "eval_every", "batch_size_train", "batch_size_test", "seeds"):
        if getattr(args, name) < 1:
            raise fail(f"--{name} must be at least 1")
    if args.batch_size_train < 2:
        raise fail("--batch_size_train must be at least 2 (contrastive negatives)")
    if args.image_size is not None and args.image_size < 8:
        raise fail("--image_size must be at least 8")
    if args.no_aug and args.protocol != "edge":
        raise fail("--no_aug only applies to --protocol edge (the lors protocol has no augmentation)")


# ----------------------------------------------------------------------------- data


def _default_cache_dir(args):
    if args.no_feature_cache:
        return None
    if args.feature_cache_dir:
        return Path(args.feature_cache_dir)
    base = os.environ.get("EDGE_CACHE_DIR") or Path.home() / ".cache" / "edge"
    return Path(base) / "text_features"


def source_name(args) -> str:
    """Short name of the training source (random-100, full, distilled:<folder>, lors:<file>)."""
    if args.baseline == "random":
        return f"random-{args.n}" + (f"-cpi{args.captions_per_image}" if args.captions_per_image > 1 else "")
    if args.baseline == "full":
        return "full"
    if args.distill_dir:
        return f"{'real-twin' if args.real_twin else 'distilled'}:{Path(args.distill_dir).resolve().name}"
    return f"lors:{Path(args.lors_pt).stem}"


def default_run_name(args) -> str:
    """<dataset> <source> [<image encoder>+<text encoder>] (+ " edge protocol" when not the default)."""
    name = f"{args.dataset} {source_name(args)} [{args.image_encoder}+{args.text_encoder}]"
    return name + (f" {args.protocol} protocol" if args.protocol != "lors" else "")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_")[:120]


# ----------------------------------------------------------------------------- main


def _check_inputs(args):
    """Validate every input before any model is built or trained.

    Returns (use_val, protocol settings, preprocess dict with the run's image size, the --lors_pt set or None).
    """
    from dataset.registry import resolve_split

    resolve_split(args.dataset, "test", args.ann_root, args.image_root)
    use_val = args.selection == "best_val" or args.eval_val
    if use_val:
        resolve_split(args.dataset, "val", args.ann_root, args.image_root)
    settings = protocol_settings(args.protocol)
    _, preprocess, _ = _probe_image_encoder(args)
    preprocess = protocol_preprocess(settings, args.image_encoder, preprocess)
    lors = None
    if args.lors_pt:
        from dataset.lors import read_lors_pt

        lors = read_lors_pt(args.lors_pt)  # read once: size, training set and learned learning rates
    if args.image_size:
        size = args.image_size
    elif settings.image_size:
        size = settings.image_size
    elif lors is not None:
        size = int(lors.images.shape[-1])
    elif args.dataset == "procedural":
        size = native_image_size(args)
    else:
        size = int(preprocess["size"])
    return use_val, settings, {**preprocess, "size": size}, lors


def _train_config(args, settings, use_val, train, lors):
    """The retrieval training settings of the protocol and flags; refuses a run in which no step would run."""
    from evaluation.train_retrieval import TrainConfig, num_training_items

    cfg = TrainConfig(epochs=args.epochs, eval_every=args.eval_every, batch_size_train=args.batch_size_train,
                      batch_size_test=args.batch_size_test, lr_img=args.lr_img, lr_txt=args.lr_txt,
                      momentum=args.momentum, weight_decay=args.weight_decay, lr_schedule=args.lr_schedule,
                      eval_val=use_val, pairs=settings.pairs,
                      augment="none" if args.no_aug else settings.augment, drop_last=settings.drop_last,
                      x0_augment=args.x0_augment)
    n_items = num_training_items(train, cfg)
    if cfg.drop_last and n_items < cfg.batch_size_train:
        raise fail(f"--protocol {args.protocol} drops the last partial batch, and the {n_items} training pairs of "
                   f"{source_name(args)} are fewer than --batch_size_train {cfg.batch_size_train}: no step would "
                   f"run; lower --batch_size_train")
    if args.lors_learned_lr:
        cfg.lr_img, cfg.lr_txt = _lors_learned_lrs(args.lors_pt, lors)
    return cfg


def _train_seeds(args, seeds, train, test, val, preprocess, cfg, accelerator, text_dim):
    """Train and select one retrieval model per seed -> (histories, per-seed selected recalls, seconds)."""
    from evaluation.train_retrieval import select_entry, train_retrieval
    from utils.models.retrieval_model import build_retrieval_model, save_retrieval_model

    histories, per_seed, seed_times = {}, [], {}
    for seed in seeds:
        t0 = time.time()
        torch.manual_seed(seed)  # the head's (and a from-scratch encoder's) initialisation
        model, _ = build_retrieval_model(args.image_encoder, text_dim, pretrained=not args.from_scratch,
                                         temperature=args.temperature, dropout=args.dropout)
        history = train_retrieval(model, train, test, preprocess, cfg, accelerator, seed, val=val,
                                  progress=not args.no_progress)
        chosen = select_entry(history, args.selection)
        histories[seed] = history
        per_seed.append({"seed": seed, "selected_epoch": chosen["epoch"], "test": chosen["test"],
                         **({"val": chosen["val"]} if "val" in chosen else {})})
        seed_times[seed] = time.time() - t0
        if args.save_model_dir:
            folder = Path(args.save_model_dir) / (f"seed_{seed}" if len(seeds) > 1 else "")
            save_retrieval_model(accelerator.unwrap_model(model).cpu(), folder, {
                "image_encoder": args.image_encoder, "text_encoder": args.text_encoder,
                "text_dim": text_dim, "preprocess": preprocess, "dropout": args.dropout,
                "trained_on": source_name(args), "dataset": args.dataset, "seed": seed, "epochs": args.epochs})
        accelerator.free_memory()
        del model
        accelerator.print(f"seed {seed}: epoch {chosen['epoch']} ({args.selection}) r_mean "
                          f"{chosen['test']['r_mean']:.2f}  [{seed_times[seed]:.0f}s]")
    return histories, per_seed, seed_times


def main(args):
    """Run the evaluation; returns the results dict (also written to <output_dir>/results.json)."""
    from accelerate import Accelerator

    from evaluation.report import (aggregate, append_table_row, final_rise, plot_r_mean, still_rising, table_row,
                                   write_results_json)
    from evaluation.train_retrieval import SELECTION_LABELS
    from utils.common.atomic_io import check_output_dir
    from utils.models.encoders import build_text_encoder

    start = time.time()
    set_cpu_threads(args.num_threads)
    run_name = args.run_name or default_run_name(args)
    output_dir = Path(args.output_dir or Path("outputs") / "eval" / _slug(run_name))
    check_output_dir(output_dir)  # a file or a read-only folder: one line before any model loads
    if args.save_model_dir:
        check_output_dir(args.save_model_dir, "--save_model_dir")
    if (output_dir / "results.json").exists() and not args.overwrite:
        raise fail(f"{output_dir / 'results.json'} exists; pass --overwrite or another --output_dir")
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    cache_dir = _default_cache_dir(args)
    use_val, settings, preprocess, lors = _check_inputs(args)
    size = preprocess["size"]

    text_encoder = build_text_encoder(args.text_encoder, device=accelerator.device)
    train, train_info = build_train_set(args, size, text_encoder, cache_dir, lors)
    test = eval_split(args, "test", size, text_encoder, cache_dir)
    val = eval_split(args, "val", size, text_encoder, cache_dir) if use_val else None
    text_encoder.to("cpu")
    cfg = _train_config(args, settings, use_val, train, lors)

    output_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(args, output_dir)
    seeds = list(range(args.seed, args.seed + args.seeds))
    histories, per_seed, seed_times = _train_seeds(args, seeds, train, test, val, preprocess, cfg, accelerator,
                                                   text_encoder.dim)
    summary = aggregate([r["test"] for r in per_seed])
    rise = final_rise(histories)
    if still_rising(rise):
        accelerator.print(f"warning: test r_mean still rose by {rise['mean']:.2f} ({100 * rise['relative']:.0f} % "
                          f"of its final value) over the last {rise['epochs']} epochs: the student has not "
                          "levelled off; the spread over seeds is partly where each seed stopped (train longer: "
                          "--epochs)")
    wall = time.time() - start
    label = SELECTION_LABELS[args.selection]
    results = {
        "run_name": run_name,
        "config": args_to_dict(args),
        **run_info(),
        "protocol": {"name": args.protocol, "pairs": cfg.pairs, "augment": cfg.augment, "x0_augment": cfg.x0_augment,
                     "drop_last": cfg.drop_last, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
                     "lr_schedule": cfg.lr_schedule,
                     "batch_size_train": cfg.batch_size_train, "sources": settings.sources},
        "image_size": size,
        "preprocess": preprocess,
        "train_set": train_info,
        "test_split": {"n_images": int(test.images.shape[0]), "n_captions": len(test.txt2img)},
        "selection": {"rule": args.selection, "label": label},
        "seeds": seeds,
        "per_seed": per_seed,
        "summary": summary,
        "final_rise": rise,
        "history": {str(s): h for s, h in histories.items()},
        "wall_time_s": wall,
        "seed_wall_time_s": {str(s): t for s, t in seed_times.items()},
    }
    write_results_json(output_dir / "results.json", results)
    plot_r_mean(output_dir / "r_mean.png", histories, f"{run_name} ({label})")
    row = table_row(run_name, label, summary, seeds, wall)
    if args.results_table:
        append_table_row(args.results_table, row)
    accelerator.print(row)
    return results


def _probe_image_encoder(args):
    """Build the image encoder once up front so a missing model fails before data loading."""
    from utils.models.encoders import build_image_encoder

    return build_image_encoder(args.image_encoder, pretrained=not args.from_scratch)


def _lors_learned_lrs(path, lors):
    extras = lors.extras
    try:
        return float(extras["syn_lr_img"]), float(extras["syn_lr_txt"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise fail(f"{path}: --lors_learned_lr needs scalar 'syn_lr_img' and 'syn_lr_txt' entries")


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
