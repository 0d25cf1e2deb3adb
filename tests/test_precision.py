"""`--mixed_precision auto`: bf16 only where the hardware has it."""
import torch

from utils.common.precision import choose_precision, weight_dtype


def test_auto_on_cpu_follows_native_bf16():
    assert choose_precision("auto", "cpu", cpu_bf16=True) == "bf16"
    assert choose_precision("auto", "cpu", cpu_bf16=False) == "no"  # AVX2-only: emulated bf16 is ~20x slower


def test_auto_on_cuda_prefers_bf16_then_fp16():
    assert choose_precision("auto", "cuda", cuda_bf16=True) == "bf16"
    assert choose_precision("auto", "cuda", cuda_bf16=False) == "fp16"
    assert choose_precision("auto", "mps") == "no"


def test_explicit_choices_are_kept():
    for value in ("no", "fp16", "bf16", None):
        assert choose_precision(value, "cpu", cpu_bf16=False) == value
    assert weight_dtype("bf16") is torch.bfloat16 and weight_dtype(None) is torch.float32
