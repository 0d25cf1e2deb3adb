"""Stage 3 with a text-only instruction model: add K-1 paraphrases of each image's prompt to a distilled set.

Each finished image is cached in <output>/caption_cache/captions.jsonl, so a rerun resumes.

Usage:
    python caption_synthesis_llama.py --input_dir runs/flickr_500 --output_dir runs/flickr_500_llama --cpi 2
    python caption_synthesis_llama.py --config configs/caption_llama.yaml --input_dir runs/flickr_500 --inplace
    python caption_synthesis_llama.py --model /models/Llama-3.1-8B-Instruct --input_dir ... --inplace
"""
from utils.common.config import add_paper_flags, parse_args_with_recipe
from utils.stages.captioning.llama import DEFAULT_INSTRUCTION, DEFAULT_MODEL, LlamaBackend
from utils.stages.captioning.runner import (add_sampled_model_args, caption_parser, run_caption_script,
                                            sampled_model_settings, script_entry)


def parse_args(argv=None):
    """Flags of the Llama backend plus the shared caption flags."""
    parser, g = caption_parser(__doc__, "llama")
    add_sampled_model_args(g, DEFAULT_MODEL, DEFAULT_INSTRUCTION, unit="prompt", max_new_tokens=60,
                           model_help="Instruction-tuned causal LM: hub id or local folder.",
                           instruction_help="Rewrite request; {caption} is replaced by the prompt.")
    return parse_args_with_recipe(add_paper_flags(parser, "caption_llama"), argv)


def main(args):
    """Caption the set with the paraphrase model; returns the run summary."""
    return run_caption_script(args, lambda: LlamaBackend(**sampled_model_settings(args)))


if __name__ == "__main__":
    raise SystemExit(script_entry(main, parse_args))
