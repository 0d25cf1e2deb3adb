"""How far fine-tuning moved a generator: the guard against a silent no-op (an EDGE run that changes nothing).

Two numbers, logged at every validation and in the run summary: the relative change of the trainable
weights, ||theta - theta_0|| / ||theta_0||, and the mean absolute pixel difference (0-255) of fixed-seed
validation samples against the starting model's.
"""
import numpy as np
import torch


def snapshot(params) -> list:
    """Detached float32 copies of parameters on the CPU (the starting point theta_0; kept off the accelerator,
    where a full-UNet copy would cost GPU memory for the whole run)."""
    return [p.detach().to("cpu", torch.float32, copy=True) for p in params]


def relative_change(params, start: list) -> float:
    """||theta - theta_0|| / ||theta_0|| over all tensors together (0 when theta_0 is all zeros and unchanged)."""
    diff = sum(float((p.detach().to("cpu", torch.float32) - s).pow(2).sum()) for p, s in zip(params, start))
    base = sum(float(s.pow(2).sum()) for s in start)
    if base == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return (diff / base) ** 0.5


def mean_abs_pixel_change(image, start_image) -> float:
    """Mean absolute difference of two same-size images in 0-255 units (PIL images or uint8 arrays)."""
    a = np.asarray(image, dtype=np.float64)
    b = np.asarray(start_image, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape} vs {b.shape}")
    return float(np.abs(a - b).mean())
