"""Stage 3 with a text-only instruction model: add K-1 paraphrases of each image's prompt to a distilled set.

Each finished image is cached in <output>/caption_cache/captions.jsonl, so a rerun resumes.

Usage:
    python caption_synthesis_llama.py --input_dir runs/flickr_500 --output_dir runs/flickr_500_llama --cpi 2
    python caption_synthesis_llama.py --config configs/caption_llama.yaml --input_dir runs/flickr_500 --inplace
    python caption_synthesis_llama.py --model /models/Llama-3.1-8B-Instruct --input_dir ... --inplace
"""
import argparse

from utils.common.config import add_paper_flags, parse_args_with_recipe
from utils.stages.captioning.cache import check_output_folder
from utils.stages.captioning.hf_models import DTYPES
from utils.stages.captioning.llama import DEFAULT_INSTRUCTION, DEFAULT_MODEL, LlamaBackend
from utils.stages.captioning.runner import add_common_args, run_captioning, script_entry


def parse_args(argv=None):
    """Flags of the Llama backend plus the shared caption flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    g = parser.add_argument_group("llama")
    g.add_argument("--model", type=str, default=DEFAULT_MODEL,
                   help="Instruction-tuned causal LM: hub id or local folder.")
    g.add_argument("--instruction", type=str, default=DEFAULT_INSTRUCTION,
                   help="Rewrite request; {caption} is replaced by the prompt.")
    g.add_argument("--batch_size", type=int, default=8, help="Prompts per generate() call.")
    g.add_argument("--max_new_tokens", type=int, default=60)
    g.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (K-1 samples per prompt).")
    g.add_argument("--top_p", type=float, default=0.9, help="Nucleus sampling mass.")
    g.add_argument("--dtype", type=str, default="auto", choices=DTYPES, help="auto: float16 on GPU, float32 on CPU.")
    return parse_args_with_recipe(add_paper_flags(parser, "caption_llama"), argv)


def main(args):
    """Caption the set with the paraphrase model; returns the run summary."""
    check_output_folder(args)  # before the backend loads a model
    backend = LlamaBackend(model=args.model, instruction=args.instruction, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           dtype=args.dtype, seed=args.seed)
    return run_captioning(args, backend)


if __name__ == "__main__":
    raise SystemExit(script_entry(main, parse_args))
