"""Stage 2's prompts: drawn from the real train captions with a fixed RNG (one caption each of distinct
images), or read from a file; their digest detects a changed prompt source on resume."""
import hashlib
import random
from pathlib import Path

from utils.common.errors import fail


def draw_prompts(train_entries, num_queries: int, seed: int, source: str = "train captions",
                 selection: str = "random", text_features=None) -> list:
    """`num_queries` prompts from Karpathy train entries: one caption each of distinct images, no repeats.

    selection "random": distinct images drawn at random; "coverage": one caption drawn per image, then the
    captions nearest the k-means centres of their `text_features(captions) -> [n, d]` (utils.stages.
    prompt_coverage). Returns [{"prompt", "image", "image_id"}] (the source image of each prompt).
    Deterministic in `seed`.
    """
    from dataset.karpathy import group_by_image

    if num_queries <= 0:
        raise fail(f"--num_queries must be positive, got {num_queries}")
    groups = group_by_image(train_entries)
    if num_queries > len(groups):
        raise fail(f"--num_queries {num_queries} exceeds the {len(groups)} distinct images of {source}")
    if selection == "random":
        rng = random.Random(f"edge-sampling-prompts:{int(seed)}")
        chosen = rng.sample(range(len(groups)), num_queries)
        return [{"prompt": rng.choice(groups[g]["captions"]), "image": groups[g]["image"],
                 "image_id": groups[g]["image_id"]} for g in chosen]
    if selection != "coverage":
        raise fail(f"unknown prompt selection {selection!r}; choose random or coverage")
    from utils.stages.prompt_coverage import coverage_choice

    rng = random.Random(f"edge-sampling-prompts-coverage:{int(seed)}")
    captions = [rng.choice(g["captions"]) for g in groups]
    chosen = coverage_choice(text_features(captions), num_queries, seed)
    return [{"prompt": captions[g], "image": groups[g]["image"], "image_id": groups[g]["image_id"]}
            for g in chosen]


def read_prompts_file(path, num_queries: int = None) -> list:
    """Prompts from a text file, one per line (the first `num_queries` when given); empty lines are errors."""
    path = Path(path)
    if not path.is_file():
        raise fail(f"prompts file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise fail(f"prompts file {path} is not UTF-8 text: {e}")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            raise fail(f"prompts file {path} line {n}: empty prompt")
    if not lines:
        raise fail(f"prompts file {path} holds no prompts")
    if num_queries is not None:
        if num_queries <= 0:
            raise fail(f"--num_queries must be positive, got {num_queries}")
        if num_queries > len(lines):
            raise fail(f"--num_queries {num_queries} exceeds the {len(lines)} prompts in {path}")
        lines = lines[:num_queries]
    return [line.strip() for line in lines]


def prompts_digest(prompts) -> str:
    """SHA-256 of the prompt list (detects a changed prompt source on resume)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8") + b"\n")
    return h.hexdigest()
