"""Stage 3 with an OpenAI-compatible vision API: add K-1 GPT captions to each image of a distilled set.

The key is read from OPENAI_API_KEY only. Each finished image is cached in
<output>/caption_cache/captions.jsonl, so rerunning the same command after a crash or Ctrl-C
sends no request for images already captioned.

Usage:
    export OPENAI_API_KEY=...
    python caption_synthesis_gpt.py --input_dir runs/flickr_500 --output_dir runs/flickr_500_cpi2 --cpi 2
    python caption_synthesis_gpt.py --config configs/caption_gpt.yaml --input_dir runs/flickr_500 --inplace
    # a compatible server (vLLM, llama.cpp, ...):
    python caption_synthesis_gpt.py --input_dir ... --inplace --base_url http://localhost:8000/v1 --model <name>
"""
from utils.common.config import add_paper_flags, parse_args_with_recipe
from utils.stages.captioning.gpt import DEFAULT_INSTRUCTION, DEFAULT_MODEL, GPTBackend
from utils.stages.captioning.runner import caption_parser, run_caption_script, script_entry


def parse_args(argv=None):
    """Flags of the GPT backend plus the shared caption flags."""
    parser, g = caption_parser(__doc__, "gpt")
    g.add_argument("--model", type=str, default=DEFAULT_MODEL, help="Chat model with image input.")
    g.add_argument("--instruction", type=str, default=DEFAULT_INSTRUCTION, help="The text sent with each image.")
    g.add_argument("--base_url", type=str, default=None, help="An OpenAI-compatible server (default: OpenAI).")
    g.add_argument("--max_concurrency", type=int, default=4, help="Requests in flight at once.")
    g.add_argument("--max_retries", type=int, default=5,
                   help="Client retries (exponential backoff) on rate limits, timeouts and server errors.")
    g.add_argument("--timeout", type=float, default=60.0, help="Seconds per request.")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--max_tokens", type=int, default=60, help="Answer length limit.")
    g.add_argument("--detail", type=str, default="low", choices=["low", "high", "auto"], help="Image detail level.")
    g.add_argument("--one_per_request", action="store_true",
                   help="Send K-1 requests with n=1 (for servers that do not support n).")
    return parse_args_with_recipe(add_paper_flags(parser, "caption_gpt"), argv)


def main(args, http_client=None):
    """Caption the set; `http_client` (an httpx client) replaces the network, for tests."""
    return run_caption_script(args, lambda: GPTBackend(
        model=args.model, instruction=args.instruction, base_url=args.base_url, max_concurrency=args.max_concurrency,
        max_retries=args.max_retries, timeout=args.timeout, temperature=args.temperature, max_tokens=args.max_tokens,
        detail=args.detail, one_per_request=args.one_per_request, http_client=http_client))


if __name__ == "__main__":
    raise SystemExit(script_entry(main, parse_args))
