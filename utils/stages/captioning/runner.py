"""The shared stage-3 runner: read a distilled set, ask a backend for K-1 new captions per image,
clean and de-duplicate them, cache each finished image, and write the same distilled-set format."""
import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from dataset.distilled import is_distilled_set, read_distilled_set, write_distilled_set
from dataset.images import load_image
from utils.common.atomic_io import atomic_write_bytes
from utils.common.config import code_version
from utils.common.errors import InputError, fail, run_cli

from .backend import CaptionRequest
from .cache import CACHE_FILE, CaptionCache, check_output_folder, settings_key
from .cleaning import clean_caption, merge_distinct
from .hf_models import DTYPES

MAX_LISTED = 1000  # images listed by name in the manifest per problem kind (the count is always exact)


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every caption script shares."""
    g = parser.add_argument_group("input/output")
    g.add_argument("--input_dir", type=str, required=True, help="Distilled-set folder (output of sampling).")
    g.add_argument("--output_dir", type=str, default=None,
                   help="Write the captioned set here (images are copied). Rerunning with the same folder resumes.")
    g.add_argument("--inplace", action="store_true", help="Rewrite the input set's annotations in place.")
    g.add_argument("--cpi", type=int, default=2,
                   help="Captions per image K: the prompt plus K-1 new ones (the paper's best: 2).")
    g.add_argument("--rounds", type=int, default=2,
                   help="Requests per image at most in one run, to replace duplicates/empty answers.")
    g.add_argument("--strict", action="store_true", help="Fail on an unreadable image instead of skipping it.")
    g.add_argument("--seed", type=int, default=0, help="Seed of sampling backends (per image, per attempt).")
    return parser


def check_common_args(args) -> None:
    """Validate the shared flags (InputError with a one-line message)."""
    if args.cpi is None or args.cpi < 1:
        raise fail(f"--cpi must be at least 1 (the prompt itself), got {args.cpi}")
    if args.rounds < 1:
        raise fail(f"--rounds must be at least 1, got {args.rounds}")
    if bool(args.inplace) == bool(args.output_dir):
        raise fail("give exactly one of --output_dir <folder> or --inplace")


def caption_parser(doc: str, backend: str):
    """A caption script's parser (described by its docstring's first line) with the shared flags, and the
    argument group for `backend`'s own flags."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_common_args(parser)
    return parser, parser.add_argument_group(backend)


def add_sampled_model_args(g, model: str, instruction: str, *, model_help: str, instruction_help: str, unit: str,
                           max_new_tokens: int) -> None:
    """Flags of a local transformers model sampling captions in batches (LLaVA, Llama); `unit`: what a batch holds."""
    g.add_argument("--model", type=str, default=model, help=model_help)
    g.add_argument("--instruction", type=str, default=instruction, help=instruction_help)
    g.add_argument("--batch_size", type=int, default=8, help=f"{unit.capitalize()}s per generate() call.")
    g.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=1.0, help=f"Sampling temperature (K-1 samples per {unit}).")
    g.add_argument("--top_p", type=float, default=0.9, help="Nucleus sampling mass.")
    g.add_argument("--dtype", type=str, default="auto", choices=DTYPES, help="auto: float16 on GPU, float32 on CPU.")


def sampled_model_settings(args) -> dict:
    """The keyword arguments of a `backend.SampledModelBackend` from the flags above (and --seed)."""
    return dict(model=args.model, instruction=args.instruction, batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, dtype=args.dtype,
                seed=args.seed)


def run_caption_script(args, make_backend) -> dict:
    """A caption script's main: the output folder and the shared flags are checked before `make_backend()`
    builds the backend (which may load a model); then the set is captioned. Returns the run summary."""
    check_output_folder(args)
    check_common_args(args)
    return run_captioning(args, make_backend())


def _output_folder(args, input_dir: Path) -> Path:
    if args.inplace:
        return input_dir
    out = Path(args.output_dir)
    if out.resolve() == input_dir.resolve():
        raise fail(f"--output_dir {out} is the input folder; use --inplace to rewrite it")
    if out.exists() and not out.is_dir():
        raise fail(f"--output_dir {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / CACHE_FILE).is_file() and not is_distilled_set(out):
        raise fail(f"--output_dir {out} exists, is not empty and holds no caption run to resume; choose a new folder")
    return out


def _find_unreadable(records, folder: Path, todo: list, strict: bool) -> dict:
    """{image: message} for images that cannot be decoded (InputError right away with --strict)."""
    bad = {}
    for i in tqdm(todo, desc="checking images", leave=False):
        try:
            load_image(folder / records[i]["image"])
        except InputError as e:
            if strict:
                raise
            bad[records[i]["image"]] = str(e)
    return bad


def _copy_images(records, src: Path, dst: Path) -> None:
    for r in tqdm(records, desc="copying images", leave=False):
        s, d = src / r["image"], dst / r["image"]
        if d.is_file() and d.stat().st_size == s.stat().st_size:
            continue
        atomic_write_bytes(d, s.read_bytes())


def _listed(items) -> list:
    items = sorted(items)
    return items[:MAX_LISTED]


def _short_message(e: Exception) -> str:
    return (" ".join(str(e).split()) or type(e).__name__)[:300]


def run_captioning(args, backend) -> dict:
    """Caption the set named by `args.input_dir` with `backend`; returns the run summary.

    Each image ends with `args.cpi` captions: its prompt (the first caption in the input) plus
    `cpi - 1` new distinct ones. Images that fail, cannot be read, or get fewer distinct captions
    keep what they have and are listed in the manifest's "captions" entry and in the summary.
    """
    check_common_args(args)
    input_dir = Path(args.input_dir)
    dset = read_distilled_set(input_dir)
    out = _output_folder(args, input_dir)
    k_new = args.cpi - 1
    backend.work_dir = out / Path(CACHE_FILE).parent
    backend.check()

    cache = CaptionCache(out / CACHE_FILE, settings_key(backend.cache_identity()))
    if cache.ignored:
        print(f"note: {cache.ignored} cached record(s) made with other settings are ignored", file=sys.stderr)
    records = dset.records
    prompts = [r["captions"][0] for r in records]
    have = {i: cache.get(r["image"], prompts[i])[:k_new] for i, r in enumerate(records)}
    todo = [i for i in range(len(records)) if len(have[i]) < k_new]
    resumed = len(records) - len(todo)
    unreadable = _find_unreadable(records, input_dir, todo, args.strict) if backend.needs_images else {}
    todo = [i for i in todo if records[i]["image"] not in unreadable]

    failed = {}
    if todo:
        backend.setup()
    rounds = 1 if backend.deterministic else args.rounds
    for attempt in range(rounds):
        todo = [i for i in todo if len(have[i]) < k_new and records[i]["image"] not in failed]
        if not todo:
            break
        requests = [CaptionRequest(index=i, image=records[i]["image"], image_path=input_dir / records[i]["image"],
                                   prompt=prompts[i], attempt=attempt,
                                   # a deterministic backend repeats its best answers: ask for all, keep new ones
                                   n=k_new if backend.deterministic else k_new - len(have[i])) for i in todo]
        desc = f"captioning ({backend.name})" + (f", round {attempt + 1}" if attempt else "")
        for req, result in tqdm(backend.generate(requests), total=len(requests), desc=desc):
            if isinstance(result, BaseException):
                failed[req.image] = _short_message(result)
                continue
            cleaned = [clean_caption(c, backend.strip_boilerplate) for c in result]
            have[req.index] = merge_distinct(req.prompt, have[req.index], cleaned, k_new)
            cache.put(req.image, req.prompt, have[req.index])

    new_records = [{"image": r["image"], "captions": [prompts[i]] + have[i]} for i, r in enumerate(records)]
    short = [r["image"] for i, r in enumerate(records)
             if len(have[i]) < k_new and r["image"] not in failed and r["image"] not in unreadable]
    summary = {
        **backend.describe(),
        "cpi": args.cpi,
        "num_images": len(records),
        "num_new_captions": sum(len(v) for v in have.values()),
        "resumed_from_cache": resumed,
        "short": {"count": len(short), "images": _listed(short)},
        "failed": {"count": len(failed), "images": [{"image": k, "error": failed[k]} for k in _listed(failed)]},
        "unreadable": {"count": len(unreadable), "images": _listed(unreadable)},
        "code_version": code_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if out != input_dir:
        _copy_images(records, input_dir, out)
    manifest = {**dset.manifest, "captions": summary}
    write_distilled_set(out, new_records, manifest)
    _print_summary(summary, out)
    return summary


def _print_summary(summary: dict, out: Path) -> None:
    print(f"wrote {out}: {summary['num_images']} images, {summary['num_new_captions']} new captions "
          f"(--cpi {summary['cpi']}, {summary['resumed_from_cache']} images from the cache)")
    for kind, what in (("short", f"got fewer than {summary['cpi'] - 1} distinct new caption(s)"),
                       ("failed", "failed after retries (rerun to retry them)"),
                       ("unreadable", "could not be read and were skipped")):
        block = summary[kind]
        if block["count"]:
            names = [x["image"] if isinstance(x, dict) else x for x in block["images"][:10]]
            more = " ..." if block["count"] > len(names) else ""
            print(f"warning: {block['count']} image(s) {what}: {', '.join(names)}{more}", file=sys.stderr)
            if kind == "failed":
                print(f"  first error: {block['images'][0]['error']}", file=sys.stderr)


def script_entry(main, parse_args, argv=None) -> int:
    """Run a caption script: 'error: ...' and exit code 2 on bad input, 1 when images failed."""
    result = {}
    code = run_cli(lambda args: result.update(summary=main(args)), parse_args, argv)
    summary = result.get("summary")
    return code or (1 if summary and summary.get("failed", {}).get("count") else 0)
