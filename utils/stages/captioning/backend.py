"""The interface every captioning backend implements; the shared runner does everything else."""
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CaptionRequest:
    """Ask for `n` new captions of one image (`prompt` is the caption it was generated from)."""
    index: int          # position of the image in the distilled set (stable across runs; used for seeds)
    image: str          # path relative to the set folder, e.g. "images/000000.png"
    image_path: Path    # absolute path of the image file
    prompt: str
    n: int
    attempt: int = 0    # 0 for the first request of this image in this run, 1 for a top-up, ...


class CaptionBackend:
    """Turns images (and their prompts) into candidate captions.

    `generate` yields `(request, captions)` as each image finishes, or `(request, exception)` for
    an image that failed for good (after the backend's own retries). It may return more or fewer
    than `request.n` candidates; the runner cleans, de-duplicates and keeps the first n.
    Errors that make every request fail (bad key, unknown model) are raised, not yielded.
    """

    name = "base"
    strip_boilerplate = True   # the instruction asked for a sentence: drop "The image shows ..."
    deterministic = False      # True when asking again returns the same captions (no top-up rounds)
    needs_images = True        # False for text-only backends
    work_dir = None            # set by the runner: a folder for the backend's own caches

    def describe(self) -> dict:
        """What the manifest records: {"backend", "model", "instruction", "settings": {...}}."""
        raise NotImplementedError

    def cache_identity(self) -> dict:
        """What makes cached captions reusable: by default backend, model and instruction."""
        d = self.describe()
        return {"backend": d["backend"], "model": d["model"], "instruction": d["instruction"]}

    def check(self) -> None:
        """Cheap checks run before any work (e.g. the API key is set); raise InputError."""

    def setup(self) -> None:
        """Load models / build clients; called only when some image needs captions."""

    def generate(self, requests):
        """Yield `(request, list_of_captions | Exception)` for each request, in any order."""
        raise NotImplementedError


class SampledModelBackend(CaptionBackend):
    """A local transformers model sampling captions in batches (LLaVA, Llama): shared settings."""

    def __init__(self, model, instruction, batch_size=8, max_new_tokens=40, temperature=1.0, top_p=0.9,
                 dtype="auto", seed=0):
        self.model_name, self.instruction = model, instruction
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.temperature, self.top_p, self.dtype, self.seed = temperature, top_p, dtype, seed
        self.model = self.device = None

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.model_name, "instruction": self.instruction,
                "settings": {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                             "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                             "dtype": self.dtype, "seed": self.seed}}


def generate_in_batches(requests, batch_size: int, sample):
    """Group requests by `n`, call `sample(batch)` per batch, yield per request.

    Running out of accelerator memory fails that batch's images (reported, retried on a rerun);
    any other error is systematic and stops the run.
    """
    import torch

    by_n = {}
    for r in requests:
        by_n.setdefault(r.n, []).append(r)
    for group in by_n.values():
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            try:
                results = sample(batch)
            except torch.OutOfMemoryError as e:
                results = [e] * len(batch)
            yield from zip(batch, results)
