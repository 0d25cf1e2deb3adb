"""Training images degraded like a diffusion model's one-step x0 estimate (`--x0_augment`).

At high noise the x0 estimate that EDGE's scorer reads is a blurred, noisy version of an image: a scorer
trained on clean images only may not recognise it at all, and then its gradient carries little. Training
the scorer on images that are, with probability `p`, Gaussian-blurred (sigma up to `max_blur` of the image
side) and overlaid with Gaussian noise (std up to `max_noise` on the [0, 1] scale) teaches it to read them.
"""
import torch

X0_AUGMENT_P = 0.5
X0_MAX_BLUR = 0.1  # of the image side: 3.2 px at 32 px
X0_MAX_NOISE = 0.1


def x0_degrade(images: torch.Tensor, gen: torch.Generator, p: float = X0_AUGMENT_P, max_blur: float = X0_MAX_BLUR,
               max_noise: float = X0_MAX_NOISE) -> torch.Tensor:
    """[B,3,S,S] uint8 -> the same, each image degraded with probability p (blur sigma, noise std uniform)."""
    from torchvision.transforms.v2 import functional as TF

    out = []
    side = images.shape[-1]
    for img in images:
        if float(torch.rand((), generator=gen)) >= p:
            out.append(img)
            continue
        x = img.float() / 255.0
        sigma = float(torch.rand((), generator=gen)) * max_blur * side
        if sigma > 0.1:
            kernel = 2 * int(3 * sigma) + 1
            x = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
        std = float(torch.rand((), generator=gen)) * max_noise
        x = x + std * torch.randn(x.shape, generator=gen)
        out.append((x.clamp(0, 1) * 255.0).round().to(torch.uint8))
    return torch.stack(out)
