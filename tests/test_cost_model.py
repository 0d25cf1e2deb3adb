"""Cost model: the arithmetic against hand-computed values, and the FLOP counting on tiny models."""
import pytest
import torch

from benchmarks.cost_model import (PartFlops, cache_flops, count_forward, count_forward_backward, edge_sample_flops,
                                   flop_counter, gpu_hours, implied_mfu, parse_args, plain_sample_flops,
                                   sampling_flops, set_unet_trainable, training_flops, training_steps)
from benchmarks.cost_report import report
from utils.common.errors import InputError

PARTS = PartFlops(text_encoder=1, vae_encode=2, unet_forward=4, unet_backward=8, vae_decode_forward=16,
                  vae_decode_backward=32, scorer_image_forward=64, scorer_image_backward=128, scorer_text=256)


def test_gpu_hours_and_implied_mfu():
    one_hour_at_half = 111.1e12 * 0.5 * 3600
    assert gpu_hours(one_hour_at_half, 111.1, 0.5) == pytest.approx(1.0)
    assert gpu_hours(2 * one_hour_at_half, 111.1, 0.25) == pytest.approx(4.0)
    assert implied_mfu(one_hour_at_half, 1.0, 111.1) == pytest.approx(0.5)
    with pytest.raises(InputError):
        gpu_hours(1.0, 111.1, 0.0)


def test_per_sample_sums():
    assert plain_sample_flops(PARTS) == 4 + 8 + 2 + 1
    assert plain_sample_flops(PARTS, cached=True) == 4 + 8
    assert edge_sample_flops(PARTS) == 511  # every part once
    assert edge_sample_flops(PARTS, cached=True) == 511 - 1 - 2 - 256


def test_training_and_sampling_totals():
    assert training_steps(145000, 128, 10) == 1133 * 10
    assert training_steps(10, 5, 2) == 4
    # 2 FLOPs x 10 pairs x 3 epochs + 5 FLOPs x ceil(10 / 4) steps x 3 epochs
    assert training_flops(2, pairs=10, epochs=3, per_step=5, batch_size=4) == 60 + 45
    # encode 3 images once, 2 text encoders once per caption (6 captions)
    assert cache_flops(PARTS, train_images=3, pairs=6) == 2 * 3 + (1 + 256) * 6
    assert cache_flops(PARTS, train_images=3, pairs=6, edge=False) == 2 * 3 + 1 * 6
    # per image: 5 steps x 2 UNet evaluations x 10 + 2 text encodings x 3 + one decode of 7
    assert sampling_flops(10, 3, 7, num_images=2, steps=5, unet_evals_per_step=2) == 2 * (100 + 6 + 7)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_linear_forward_backward_counts(device):
    layer = torch.nn.Linear(3, 5, device=device)
    x = torch.randn(4, 3, device=device, requires_grad=True)
    assert count_forward(lambda: layer(x)) == 2 * 4 * 3 * 5
    # backward: input gradient + weight gradient, each one matmul of the forward's size
    assert count_forward_backward(lambda: layer(x)) == (120, 240)
    layer.weight.requires_grad_(False)  # frozen weight: activation gradient only
    assert count_forward_backward(lambda: layer(x)) == (120, 120)


def test_attention_is_counted_on_cpu():
    q = torch.randn(1, 2, 8, 4)
    with flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * (2 * 1 * 2 * 8 * 8 * 4)  # QK^T and PV


def test_difffit_backward_skips_weight_gradients():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    x = torch.randn(4, 3)
    set_unet_trainable(net, "full")
    # last layer: input grad 80 + weight grad 80; first layer: weight grad 120, no input grad
    assert count_forward_backward(lambda: net(x))[1] == 80 + 80 + 120
    set_unet_trainable(net, "difffit")
    # only biases and the norm train: the last layer still passes the activation gradient back
    assert count_forward_backward(lambda: net(x))[1] == 80


def test_report_totals_from_given_counts():
    parts = PartFlops(text_encoder=0, vae_encode=0, unet_forward=1e14, unet_backward=1e14, vae_decode_forward=5e13,
                      vae_decode_backward=5e13, scorer_image_forward=2e13, scorer_image_backward=2e13,
                      scorer_text=2e13)
    entry = dict(parts=parts, unet_backward_full=2e14, taesd_forward=1e13, taesd_backward=1e13,
                 edge_step=3.4e14, edge_step_checkpointed=4e14)
    counts = dict(text_encoder=0, edge_loss_per_step=0, by_res={224: entry, 512: entry})
    args = parse_args(["--pairs", "10", "--epochs", "1", "--batch_size", "10", "--train_images", "2",
                       "--num_images", "1", "--steps", "1", "--fast_steps", "1", "--unet_evals_per_step", "1",
                       "--peak_tflops", "1", "--mfu", "0.5"])
    text = report(counts, args)
    # 10 samples x 3.6e14 + one image (1e14 UNet + 5e13 decode) = 3.75e15 FLOPs at 0.5 TFLOPS
    line = next(ln for ln in text.splitlines() if ln.startswith("| **EDGE total: fine-tuning at 224 px"))
    assert "| **2.08** |" in line and line.endswith("| 0.08 |")  # 3.75e15 / (1e12 x 13.6 h) = 0.077
    # DiffFit saves (2e14 - 1e14) x 10 samples = 1e15 FLOPs = 0.56 h, 27% of 3.75e15
    line = next(ln for ln in text.splitlines() if ln.startswith("| (e) DiffFit"))
    assert "0.56 h (27%)" in line


def test_bad_flags_are_input_errors():
    with pytest.raises(InputError, match="--resolution"):
        parse_args(["--resolution", "500"])
    with pytest.raises(InputError, match="--mfu"):
        parse_args(["--mfu", "1.5"])
