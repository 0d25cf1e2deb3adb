"""Loading transformers models for captioning: device, dtype and one-line errors naming the model."""
from pathlib import Path

import torch

from utils.common.errors import fail

DTYPES = ("auto", "float32", "float16", "bfloat16")


def caption_device() -> torch.device:
    """The accelerate device of this process (GPU when present, else CPU)."""
    from accelerate import PartialState

    return PartialState().device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` means float16 on an accelerator and float32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type != "cpu" else torch.float32
    return getattr(torch, name)


def load_pretrained(loader, name_or_path: str, what: str, **kwargs):
    """`loader.from_pretrained(name_or_path, **kwargs)` with a clear InputError when it is not available."""
    try:
        return loader.from_pretrained(str(name_or_path), **kwargs)
    except (OSError, ValueError, EnvironmentError, KeyError) as e:
        where = ("the local folder " + str(name_or_path)) if Path(str(name_or_path)).exists() else \
            f"a local folder or a cached hub copy of '{name_or_path}'"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise fail(f"could not load the {what} from {where} ({type(e).__name__}: {first}); "
                   f"download it once (e.g. `hf download {name_or_path} --local-dir <dir>`) and pass the folder")
