"""Transformers captioning models' device and dtype (loading itself: `utils.models.loading.from_pretrained`)."""
import torch

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

