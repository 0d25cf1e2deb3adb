"""Which precision to train and sample in: `--mixed_precision auto` picks one that is fast on this device.

bf16 autocast on a CPU without native bf16 (AVX2 only, no AVX512-BF16/AMX) is emulated and about 20x
slower than fp32 (DESIGN §8), so `auto` only chooses bf16 where the hardware has it.
"""
import torch

PRECISIONS = ("no", "fp16", "bf16", "auto")
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """True when oneDNN reports native bf16 on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_precision(requested, device_type: str, cpu_bf16: bool = None, cuda_bf16: bool = None) -> str:
    """The accelerate precision ("no", "fp16", "bf16") for `requested` on `device_type` ("cpu"/"cuda"/...).

    "auto": bf16 on CUDA devices that support it, else fp16 on CUDA; bf16 on a CPU with native bf16,
    else fp32 ("no"). Other values (and None, accelerate's default) are returned unchanged.
    """
    if requested != "auto":
        return requested
    if device_type == "cuda":
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp16"
    if device_type == "cpu":
        native = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
        return "bf16" if native else "no"
    return "no"  # mps and others: fp32 is the safe choice


def resolve_precision(requested, cpu: bool = False) -> str:
    """`choose_precision` for the device this process will run on; prints the choice for "auto"."""
    device = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
    chosen = choose_precision(requested, device)
    if requested == "auto":
        why = "native bf16" if chosen == "bf16" and device == "cpu" else (
            "no native bf16 on this CPU" if device == "cpu" else "CUDA")
        print(f"mixed_precision auto -> {chosen} ({device}: {why})", flush=True)
    return chosen


def weight_dtype(mixed_precision) -> torch.dtype:
    """torch dtype for an accelerate precision name ("no"/None -> float32)."""
    return DTYPES.get(mixed_precision or "no", torch.float32)
