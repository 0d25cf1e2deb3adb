"""Stage 2 of EDGE: sample a distilled set of N images from N prompts with a (fine-tuned) Stable Diffusion.

Prompts are drawn deterministically from the real train captions (one caption each of N distinct
images) or read from --prompts_file. Image i uses its own seed derived from (--seed, i), so the set is
the same for any number of processes; a rerun skips finished images. Output: a distilled-set folder
(images/000000.png ..., annotations/train.json, images/metadata.jsonl, manifest.json, preview.png).

Usage:
    python edge_diffusion_sampling.py --pretrained_model_name_or_path runs/edge-flickr \\
        --dataset flickr30k --ann_root data/annotations --image_root data/flickr30k \\
        --num_queries 500 --output_dir outputs/flickr-500
    # several GPUs (same set as one process):
    accelerate launch --num_processes 4 edge_diffusion_sampling.py --config configs/sample_flickr30k.yaml ...
    # unmodified SD (the "no EDGE losses" ablation), fewer steps with DPM-Solver++:
    python edge_diffusion_sampling.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts_file prompts.txt --scheduler dpmsolver++ --num_inference_steps 20 --output_dir outputs/sd15
    # convert the public code's layout (images/{i}.png + prompts/{i}.txt):
    python edge_diffusion_sampling.py --convert_from_legacy old_run/ --output_dir outputs/converted
"""
import argparse
import sys

from dataset.registry import DATASETS
from utils.common.config import add_paper_flags, parse_args_with_recipe
from utils.common.errors import fail, run_cli
from utils.stages.sampling import DEFAULT_GUIDANCE_SCALE, DTYPES, IMAGE_FORMATS, SCHEDULERS


def parse_args(argv=None):
    """Parse the sampling flags (a --config recipe sets defaults; flags win) and validate them."""
    p = argparse.ArgumentParser(description="EDGE stage 2: sample a distilled set.")
    g = p.add_argument_group("prompts")
    g.add_argument("--num_queries", type=int, default=None, help="Number of images/prompts N.")
    g.add_argument("--prompts_file", type=str, default=None, help="One prompt per line (instead of a data set).")
    g.add_argument("--dataset", choices=DATASETS, default=None, help="Data set whose train captions are drawn.")
    g.add_argument("--ann_root", type=str, default=None, help="Annotation folder (or file) of --dataset.")
    g.add_argument("--image_root", type=str, default=None, help="Image root of --dataset (existence is checked).")
    g.add_argument("--prompt_selection", choices=["random", "coverage"], default="random",
                   help="random: N random distinct train images' captions (the paper); coverage: the captions "
                        "nearest the N k-means centres of all train captions' text features")
    g.add_argument("--coverage_text_encoder", type=str, default="minilm",
                   help="caption features for --prompt_selection coverage: a sentence encoder (evaluation's "
                        "--text_encoder names) or scorer:<scorer spec> for a scorer's text tower, e.g. "
                        "scorer:retrieval:<folder>")
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="Folder written by edge_diffusion_train.py, or any diffusers SD model id/folder.")
    g.add_argument("--lora_weights", type=str, default=None, help="LoRA weights (file or folder) on the base model.")
    g.add_argument("--scheduler", choices=list(SCHEDULERS), default="default")
    g.add_argument("--num_inference_steps", type=int, default=50)
    g.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    g.add_argument("--height", type=int, default=None, help="Default: unet sample_size * VAE scale factor.")
    g.add_argument("--width", type=int, default=None, help="Default: unet sample_size * VAE scale factor.")
    g.add_argument("--negative_prompt", type=str, default=None)
    g.add_argument("--best_of", type=int, default=1,
                   help="draw K candidates per prompt and keep the one --best_of_scorer ranks highest (1: off)")
    g.add_argument("--best_of_scorer", type=str, default=None,
                   help="scorer spec for --best_of (retrieval:<folder> | open_clip:<model>/<tag> | hf_clip:<id>)")
    g.add_argument("--mixed_precision", "--dtype", dest="mixed_precision", choices=list(DTYPES), default="no",
                   help="Weights dtype: no (fp32), fp16, bf16.")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch_size", type=int, default=1, help="Images per pipeline call.")
    g.add_argument("--channels_last", action="store_true", help="channels-last UNet/VAE (faster on some GPUs).")
    g.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    g.add_argument("--output_dir", type=str, default=None)
    g.add_argument("--overwrite", action="store_true", help="Replace a set made with other settings.")
    g.add_argument("--preview_n", type=int, default=16, help="Images in preview.png (0: none).")
    g.add_argument("--image_format", choices=list(IMAGE_FORMATS), default="png")
    g.add_argument("--no_progress", action="store_true")
    g.add_argument("--convert_from_legacy", type=str, default=None,
                   help="Convert a folder in the public code's layout (images/{i}.png + prompts/{i}.txt) and exit.")
    args = parse_args_with_recipe(add_paper_flags(p, "sampling"), argv)

    if not args.output_dir:
        raise fail("--output_dir is required")
    if args.convert_from_legacy:
        return args
    if not args.pretrained_model_name_or_path:
        raise fail("--pretrained_model_name_or_path is required")
    if args.num_queries is not None and args.num_queries <= 0:
        raise fail(f"--num_queries must be positive, got {args.num_queries}")
    if args.prompts_file and args.dataset:
        raise fail("give either --prompts_file or --dataset, not both")
    if args.prompts_file and args.prompt_selection != "random":
        raise fail("--prompt_selection applies to --dataset captions, not to --prompts_file")
    if not args.prompts_file:
        if not args.dataset:
            raise fail("give --dataset (with --ann_root) or --prompts_file")
        if args.num_queries is None:
            raise fail("--num_queries is required with --dataset")
    if args.batch_size <= 0:
        raise fail(f"--batch_size must be positive, got {args.batch_size}")
    if args.num_inference_steps <= 0:
        raise fail(f"--num_inference_steps must be positive, got {args.num_inference_steps}")
    if args.best_of < 1:
        raise fail(f"--best_of must be at least 1, got {args.best_of}")
    if args.best_of > 1 and not args.best_of_scorer:
        raise fail("--best_of > 1 needs --best_of_scorer (the retrieval model that ranks the candidates)")
    if args.preview_n < 0:
        raise fail(f"--preview_n must be >= 0, got {args.preview_n}")
    return args


def load_prompts(args) -> tuple:
    """(prompts, prompt_source manifest entry) from --prompts_file or the data set's train captions."""
    from pathlib import Path

    from utils.stages.sampling_prompts import draw_prompts, read_prompts_file

    if args.prompts_file:
        prompts = read_prompts_file(args.prompts_file, args.num_queries)
        return prompts, {"type": "prompts_file", "path": str(Path(args.prompts_file).resolve()),
                         "num_prompts": len(prompts)}
    from dataset.registry import read_split

    entries, ann_file, _ = read_split(args.dataset, "train", args.ann_root, args.image_root)
    features = None
    if args.prompt_selection == "coverage":
        from utils.stages.prompt_coverage import caption_featurizer

        features = caption_featurizer(args.coverage_text_encoder)
    drawn = draw_prompts(entries, args.num_queries, args.seed, source=f"{args.dataset} train ({ann_file})",
                         selection=args.prompt_selection, text_features=features)
    draw = ("one caption each of num_queries distinct train images, random.Random('edge-sampling-prompts:<seed>')"
            if args.prompt_selection == "random" else
            f"coverage: one caption per train image, k-means (seed) on {args.coverage_text_encoder} features, "
            "the caption nearest each centre")
    source = {"type": "dataset", "dataset": args.dataset, "split": "train", "ann_file": str(Path(ann_file).resolve()),
              "draw": draw, "source_images": [d["image"] for d in drawn]}
    return [d["prompt"] for d in drawn], source


def main(args):
    """Run the sampling stage (or the legacy conversion) and return the output folder."""
    from utils.common.atomic_io import check_output_dir
    from utils.stages.legacy_layout import convert_legacy
    from utils.stages.sampling import sample_distilled_set

    check_output_dir(args.output_dir)  # before prompts are read and the model loads
    if args.convert_from_legacy:
        return convert_legacy(args.convert_from_legacy, args.output_dir, overwrite=args.overwrite,
                              preview_n=args.preview_n)
    prompts, source = load_prompts(args)
    return sample_distilled_set(
        args.pretrained_model_name_or_path, prompts, source, args.output_dir, scheduler=args.scheduler,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, height=args.height,
        width=args.width, negative_prompt=args.negative_prompt, dtype=args.mixed_precision, seed=args.seed,
        batch_size=args.batch_size, lora_weights=args.lora_weights, overwrite=args.overwrite,
        preview_n=args.preview_n, image_format=args.image_format, channels_last=args.channels_last,
        attention=args.attention, progress=not args.no_progress, best_of=args.best_of,
        best_of_scorer=args.best_of_scorer)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
