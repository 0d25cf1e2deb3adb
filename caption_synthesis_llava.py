"""Stage 3 with LLaVA-1.5 (transformers): add K-1 sampled captions to each image of a distilled set.

Each finished image is cached in <output>/caption_cache/captions.jsonl, so a rerun resumes.

Usage:
    python caption_synthesis_llava.py --input_dir runs/flickr_500 --output_dir runs/flickr_500_llava --cpi 2
    python caption_synthesis_llava.py --config configs/caption_llava.yaml --input_dir runs/flickr_500 --inplace
    python caption_synthesis_llava.py --model /models/llava-1.5-7b-hf --input_dir ... --inplace
"""
import argparse

from utils.common.config import add_paper_flags, parse_args_with_recipe
from utils.stages.captioning.cache import check_output_folder
from utils.stages.captioning.hf_models import DTYPES
from utils.stages.captioning.llava import DEFAULT_INSTRUCTION, DEFAULT_MODEL, LlavaBackend
from utils.stages.captioning.runner import add_common_args, run_captioning, script_entry


def parse_args(argv=None):
    """Flags of the LLaVA backend plus the shared caption flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    g = parser.add_argument_group("llava")
    g.add_argument("--model", type=str, default=DEFAULT_MODEL, help="LLaVA hub id or local folder.")
    g.add_argument("--instruction", type=str, default=DEFAULT_INSTRUCTION, help="The question asked about each image.")
    g.add_argument("--batch_size", type=int, default=8, help="Images per generate() call.")
    g.add_argument("--max_new_tokens", type=int, default=40)
    g.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (K-1 samples per image).")
    g.add_argument("--top_p", type=float, default=0.9, help="Nucleus sampling mass.")
    g.add_argument("--dtype", type=str, default="auto", choices=DTYPES, help="auto: float16 on GPU, float32 on CPU.")
    return parse_args_with_recipe(add_paper_flags(parser, "caption_llava"), argv)


def main(args):
    """Caption the set with LLaVA; returns the run summary."""
    check_output_folder(args)  # before the backend loads a model
    backend = LlavaBackend(model=args.model, instruction=args.instruction, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           dtype=args.dtype, seed=args.seed)
    return run_captioning(args, backend)


if __name__ == "__main__":
    raise SystemExit(script_entry(main, parse_args))
