"""--x0_augment: training images blurred and noised like a one-step x0 estimate, seeded, uint8 in and out."""
import torch

from evaluation.x0_augment import x0_degrade


def _stripes():
    img = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    img[..., ::2] = 255  # one-pixel vertical stripes: any blur flattens them
    return img


def test_probability_zero_leaves_images_alone_and_one_blurs_them():
    gen = torch.Generator().manual_seed(0)
    img = _stripes()
    assert torch.equal(x0_degrade(img, gen, p=0.0), img)
    out = x0_degrade(img, torch.Generator().manual_seed(1), p=1.0, max_blur=0.1, max_noise=0.0)
    assert out.dtype == torch.uint8 and out.shape == img.shape
    assert out.float().std() < 0.5 * img.float().std()  # stripes of std 127.5 smoothed towards their mean 127.5
    assert abs(out.float().mean() - 127.5) < 5


def test_noise_only_adds_noise_and_the_draw_is_fixed_by_the_generator():
    flat = torch.full((2, 3, 16, 16), 128, dtype=torch.uint8)
    a = x0_degrade(flat, torch.Generator().manual_seed(3), p=1.0, max_blur=0.0, max_noise=0.2)
    b = x0_degrade(flat, torch.Generator().manual_seed(3), p=1.0, max_blur=0.0, max_noise=0.2)
    assert torch.equal(a, b) and not torch.equal(a, flat)
    assert (a.float() - 128).abs().max() <= 0.2 * 255 * 5  # within 5 std of the largest noise
