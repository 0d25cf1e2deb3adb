"""Per-image caption cache: one JSON line appended per finished image, so a rerun resumes.

A record is {"image", "prompt", "settings", "captions"}; `settings` is a hash of what makes the
captions (backend, model, instruction), so changing any of them starts afresh instead of mixing.
The last record of an image wins; a truncated last line (a killed run) is ignored.
"""
import hashlib
import json
from pathlib import Path

from utils.common.atomic_io import append_jsonl, check_output_dir, read_jsonl
from utils.common.errors import fail

CACHE_FILE = "caption_cache/captions.jsonl"


def check_output_folder(args) -> None:
    """Before any model loads: the folder receiving the set and its cache (--output_dir, or the input with
    --inplace) must be a writable folder; one line otherwise."""
    if args.output_dir:
        check_output_dir(args.output_dir, "--output_dir")
    elif getattr(args, "inplace", False):
        check_output_dir(args.input_dir, "--input_dir (with --inplace)")


def settings_key(settings: dict) -> str:
    """A short stable hash of the settings that determine the captions."""
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class CaptionCache:
    """Captions already obtained, keyed by image path, for one settings key."""

    def __init__(self, path, key: str):
        self.path = Path(path)
        self.key = key
        self.captions = {}
        self.ignored = 0  # records made with other settings
        try:
            records = read_jsonl(self.path)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise fail(f"caption cache {self.path} is corrupt ({e}); delete it to start afresh")
        for r in records:
            if not isinstance(r, dict) or not isinstance(r.get("captions"), list):
                raise fail(f"caption cache {self.path}: malformed record {str(r)[:80]!r}; delete it to start afresh")
            if r.get("settings") != key:
                self.ignored += 1
                continue
            self.captions[(r.get("image"), r.get("prompt"))] = list(r["captions"])

    def get(self, image: str, prompt: str) -> list:
        """Cached new captions of (image, prompt), [] when none."""
        return list(self.captions.get((image, prompt), []))

    def put(self, image: str, prompt: str, captions: list) -> None:
        """Record the captions of one image (durably, before returning)."""
        self.captions[(image, prompt)] = list(captions)
        append_jsonl(self.path, {"image": image, "prompt": prompt, "settings": self.key, "captions": list(captions)})
