"""Stage 3 with LLaVA-1.5 (transformers): add K-1 sampled captions to each image of a distilled set.

Each finished image is cached in <output>/caption_cache/captions.jsonl, so a rerun resumes.

Usage:
    python caption_synthesis_llava.py --input_dir runs/flickr_500 --output_dir runs/flickr_500_llava --cpi 2
    python caption_synthesis_llava.py --config configs/caption_llava.yaml --input_dir runs/flickr_500 --inplace
    python caption_synthesis_llava.py --model /models/llava-1.5-7b-hf --input_dir ... --inplace
"""
from utils.common.config import add_paper_flags, parse_args_with_recipe
from utils.stages.captioning.llava import DEFAULT_INSTRUCTION, DEFAULT_MODEL, LlavaBackend
from utils.stages.captioning.runner import (add_sampled_model_args, caption_parser, run_caption_script,
                                            sampled_model_settings, script_entry)


def parse_args(argv=None):
    """Flags of the LLaVA backend plus the shared caption flags."""
    parser, g = caption_parser(__doc__, "llava")
    add_sampled_model_args(g, DEFAULT_MODEL, DEFAULT_INSTRUCTION, unit="image", max_new_tokens=40,
                           model_help="LLaVA hub id or local folder.",
                           instruction_help="The question asked about each image.")
    return parse_args_with_recipe(add_paper_flags(parser, "caption_llava"), argv)


def main(args):
    """Caption the set with LLaVA; returns the run summary."""
    return run_caption_script(args, lambda: LlavaBackend(**sampled_model_settings(args)))


if __name__ == "__main__":
    raise SystemExit(script_entry(main, parse_args))
