"""One way to call `from_pretrained` (transformers, diffusers) with a one-line InputError naming the model.

Every loader of a hub id or folder goes through `from_pretrained` here, so a missing model always says what
was being loaded, where it was looked for, and how to get it (this machine may have no network).
"""
from pathlib import Path

from utils.common.errors import fail


def where(source) -> str:
    """Where a hub id or folder was looked for, in words."""
    if Path(str(source)).exists():
        return f"the local folder {source}"
    return f"a local folder or a cached hub copy of '{source}'"


def download_hint(source) -> str:
    return f"download it once (e.g. `hf download {source} --local-dir <dir>`) and pass the folder"


def from_pretrained(loader, source, what: str, hint: str = None, **kwargs):
    """`loader.from_pretrained(str(source), **kwargs)`; any failure becomes one line naming `what` and `source`."""
    try:
        return loader.from_pretrained(str(source), **kwargs)
    except Exception as e:  # noqa: BLE001 - any load failure: one clear line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise fail(f"could not load the {what} from {where(source)} ({type(e).__name__}: {first}); "
                   f"{hint or download_hint(source)}") from e
