"""Stage 3 offline: give each image the K-1 real training captions a scorer ranks highest for it.

Needs no generative model and no network (used by the offline demo). The caption pool is the
train split of --dataset; the image's own prompt and its exact duplicates are skipped. Pool text
features are saved in <output>/caption_cache/ and reused by later runs.

Usage:
    python caption_synthesis_retrieval.py --input_dir runs/demo_set --output_dir runs/demo_set_cpi2 --cpi 2 \
        --dataset procedural --ann_root data/procedural --scorer hf_clip:runs/tiny_clip
    python caption_synthesis_retrieval.py --config configs/caption_retrieval.yaml --input_dir runs/flickr_500 --inplace
"""
from dataset.registry import DATASETS
from utils.common.config import parse_args_with_recipe
from utils.stages.captioning.retrieval import DEFAULT_SCORER, RetrievalBackend
from utils.stages.captioning.runner import caption_parser, run_caption_script, script_entry


def parse_args(argv=None):
    """Flags of the retrieval backend plus the shared caption flags."""
    parser, g = caption_parser(__doc__, "retrieval")
    g.add_argument("--scorer", type=str, default=DEFAULT_SCORER,
                   help="Image-text scorer spec (utils.models.scorers): open_clip:..., hf_clip:..., "
                        "retrieval:<folder>.")
    g.add_argument("--dataset", type=str, default=None, choices=DATASETS, help="Real data set of the caption pool.")
    g.add_argument("--ann_root", type=str, default=None, help="Its annotation folder (or train JSON file).")
    g.add_argument("--image_root", type=str, default=None, help="Its image root (only for path resolution).")
    g.add_argument("--batch_size", type=int, default=32, help="Images encoded per batch.")
    return parse_args_with_recipe(parser, argv)


def main(args):
    """Caption the set from the real pool; returns the run summary."""
    return run_caption_script(args, lambda: RetrievalBackend(scorer=args.scorer, dataset=args.dataset,
                                                             ann_root=args.ann_root, image_root=args.image_root,
                                                             batch_size=args.batch_size))


if __name__ == "__main__":
    raise SystemExit(script_entry(main, parse_args))
