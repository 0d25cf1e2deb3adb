"""Cost model of EDGE in the paper's setting, derived from FLOP counts.

Each model of the paper's setting (Stable Diffusion v1.5 UNet and VAE, CLIP ViT-L/14 text
encoder, open_clip ViT-B/32 scorer, TAESD) is built from its config on the meta device (no
weights, no hub access) and its forward and backward passes are counted with
`torch.utils.flop_counter.FlopCounterMode` at batch 1 (every count is linear in the batch). The
backward passes are counted directly, with `requires_grad` set as in training: only the UNet's
trainable set gets weight gradients; the frozen VAE decoder and scorer only pass activation
gradients through. Attention runs through PyTorch's math kernel so its matmuls are counted.
The counter counts matmuls and convolutions (2 FLOPs per multiply-add); normalisation and
element-wise ops are not counted (they cost memory bandwidth, which the utilisation absorbs).

FLOPs become GPU-hours on one RTX A5000 as FLOPs / (peak x MFU): peak = 111 TFLOPS dense fp16
tensor throughput (222 with sparsity; 27.8 fp32 non-tensor), MFU a stated assumption.

Usage:
    python -m benchmarks.cost_model                      # paper setting, prints Markdown
    python -m benchmarks.cost_model --mfu 0.35 --mfu_range 0.25 0.45 --resolution 512 \
        --public_resolution 224 --batch_size 128 --epochs 10 --pairs 145000 --train_images 29000 \
        --num_images 500 --steps 50 --fast_steps 20
"""
import argparse
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from utils.common.config import parse_args_with_recipe
from utils.common.errors import fail

A5000_DENSE_FP16_TFLOPS = 111.1  # 222.2 TFLOPS "with sparsity" / 2 (NVIDIA RTX A5000 data sheet)
PAPER_EDGE_GPU_HOURS = 13.6      # EDGE, 500-pair Flickr30K set, one RTX A5000 (paper)
PAPER_LORS_GPU_HOURS = 54.2      # LoRS, same set (as quoted by the paper)
SCORER_RESOLUTION = 224          # CLIP ViT-B/32 input size
TEXT_TOKENS = 77                 # CLIP context length

# Stable Diffusion v1.5 UNet (runwayml/stable-diffusion-v1-5, unet/config.json).
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
# Stable Diffusion v1.5 VAE (vae/config.json).
SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    norm_num_groups=32, scaling_factor=0.18215,
)
# CLIP ViT-L/14 text encoder (SD v1.5 text_encoder/config.json).
CLIP_L14_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
)


# ---------------------------------------------------------------- pure arithmetic

def gpu_hours(flops: float, peak_tflops: float = A5000_DENSE_FP16_TFLOPS, mfu: float = 0.35) -> float:
    """Hours on one GPU that sustains `mfu` x `peak_tflops` to execute `flops`."""
    if peak_tflops <= 0 or not 0 < mfu <= 1:
        raise fail(f"need peak_tflops > 0 and 0 < mfu <= 1, got {peak_tflops} and {mfu}")
    return flops / (peak_tflops * 1e12 * mfu) / 3600.0


def implied_mfu(flops: float, hours: float, peak_tflops: float = A5000_DENSE_FP16_TFLOPS) -> float:
    """The utilisation at which `flops` take `hours` on one GPU of `peak_tflops`."""
    return flops / (peak_tflops * 1e12 * hours * 3600.0)


@dataclass
class PartFlops:
    """FLOPs per training sample of each part of a step at one resolution (forward / backward)."""
    text_encoder: float          # CLIP ViT-L/14 text forward, one caption (frozen, cacheable)
    vae_encode: float            # VAE encoder forward, one image (frozen, cacheable)
    unet_forward: float
    unet_backward: float         # with the trainable set's weight gradients (DiffFit in the paper)
    vae_decode_forward: float    # decoding the x0 estimate for the scorer
    vae_decode_backward: float   # activation gradients only (frozen decoder)
    scorer_image_forward: float
    scorer_image_backward: float  # activation gradients only (frozen scorer)
    scorer_text: float           # scorer text forward, one caption (frozen, cacheable)


def plain_sample_flops(p: PartFlops, cached: bool = False) -> float:
    """Plain fine-tuning FLOPs per sample: UNet forward + backward, plus encoders unless cached."""
    flops = p.unet_forward + p.unet_backward
    return flops if cached else flops + p.vae_encode + p.text_encoder


def edge_sample_flops(p: PartFlops, cached: bool = False) -> float:
    """EDGE FLOPs per sample: plain step + decode the x0 estimate + scorer, forward and backward."""
    flops = plain_sample_flops(p, cached) + p.vae_decode_forward + p.vae_decode_backward
    flops += p.scorer_image_forward + p.scorer_image_backward
    return flops if cached else flops + p.scorer_text


def training_steps(pairs: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of `epochs` passes over `pairs` samples (the last batch may be partial)."""
    return math.ceil(pairs / batch_size) * epochs


def training_flops(per_sample: float, pairs: int, epochs: int, per_step: float = 0.0,
                   batch_size: int = 1) -> float:
    """Total FLOPs of training: per-sample work x samples seen + per-step work x steps."""
    return per_sample * pairs * epochs + per_step * training_steps(pairs, batch_size, epochs)


def cache_flops(p: PartFlops, train_images: int, pairs: int, edge: bool = True) -> float:
    """One-off FLOPs to cache VAE latents (once per image) and text features (once per caption)."""
    flops = p.vae_encode * train_images + p.text_encoder * pairs
    return flops + (p.scorer_text * pairs if edge else 0.0)


def sampling_flops(unet_forward: float, text_encoder: float, vae_decode: float, num_images: int,
                   steps: int, unet_evals_per_step: int = 2) -> float:
    """FLOPs of rendering `num_images` images with classifier-free guidance.

    Per image: `steps` x `unet_evals_per_step` UNet forwards (conditional + unconditional, or one
    batch of 2), two text encodings (prompt and empty negative prompt), one VAE decode.
    """
    return num_images * (steps * unet_evals_per_step * unet_forward + 2 * text_encoder + vae_decode)


# ---------------------------------------------------------------- counting

@contextmanager
def flop_counter():
    """A FlopCounterMode in which scaled-dot-product attention runs as countable matmuls."""
    # PyTorch's CPU flash-attention kernel has no registered FLOP formula: it would count as 0.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        yield counter


def count_forward_backward(forward) -> tuple:
    """(forward FLOPs, backward FLOPs) of `forward()` and of back-propagating its output's sum."""
    with flop_counter() as fwd:
        out = forward()
    with flop_counter() as bwd:
        out.float().sum().backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def count_forward(forward) -> int:
    """FLOPs of `forward()` run without gradients."""
    with torch.no_grad(), flop_counter() as fwd:
        forward()
    return fwd.get_total_flops()


def _meta(shape, requires_grad=False, dtype=torch.float32):
    return torch.randn(*shape, device="meta", dtype=dtype).requires_grad_(requires_grad)


def build_models() -> dict:
    """The paper's models from their configs on the meta device (shapes only, no weights)."""
    import open_clip
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        taesd = AutoencoderTiny()
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT_CONFIG))
    # open_clip initialises on the CPU and moves the model itself.
    scorer = open_clip.create_model("ViT-B-32", pretrained=None, device="meta")
    for m in (unet, vae, taesd, text_encoder, scorer):
        m.requires_grad_(False)
    return dict(unet=unet, vae=vae, taesd=taesd, text_encoder=text_encoder, scorer=scorer)


def set_unet_trainable(unet, trainable: str) -> None:
    """Give the UNet's trainable set ("difffit" or "full") gradients, freezing the rest."""
    from utils.method.trainable_params import configure_trainable

    configure_trainable(unet, trainable)


def unet_call(unet, res_latent: int, batch: int = 1):
    """A closure running the UNet on a noisy latent of side `res_latent` with 77x768 text states."""
    def run():
        x = _meta((batch, unet.config.in_channels, res_latent, res_latent))
        states = _meta((batch, TEXT_TOKENS, unet.config.cross_attention_dim))
        return unet(x, torch.full((batch,), 500, device="meta"), states).sample
    return run


def count_unet(unet, res_latent: int) -> dict:
    """UNet forward and backward FLOPs (per sample) with the DiffFit and full trainable sets."""
    out = {}
    for trainable in ("difffit", "full"):
        set_unet_trainable(unet, trainable)
        out["forward"], out[f"backward_{trainable}"] = count_forward_backward(unet_call(unet, res_latent))
    unet.requires_grad_(False)
    return out


def count_decoder(autoencoder, res_latent: int) -> tuple:
    """(forward, backward) FLOPs of decoding one latent with gradients flowing to the latent only."""
    channels = autoencoder.config.latent_channels
    return count_forward_backward(lambda: autoencoder.decode(_meta((1, channels, res_latent, res_latent),
                                                                   requires_grad=True)).sample)


def count_scorer(scorer) -> dict:
    """Scorer image forward/backward (activation gradients only) and text forward, per sample."""
    fwd, bwd = count_forward_backward(
        lambda: scorer.encode_image(_meta((1, 3, SCORER_RESOLUTION, SCORER_RESOLUTION), requires_grad=True)))
    tokens = torch.zeros(1, TEXT_TOKENS, dtype=torch.long, device="meta")
    return dict(image_forward=fwd, image_backward=bwd, text=count_forward(lambda: scorer.encode_text(tokens)))


def count_text_encoder(text_encoder) -> int:
    """CLIP ViT-L/14 text encoder forward FLOPs for one 77-token caption."""
    tokens = torch.zeros(1, TEXT_TOKENS, dtype=torch.long, device="meta")
    return count_forward(lambda: text_encoder(tokens))


def count_edge_loss(batch_size: int, dim: int) -> int:
    """FLOPs of the EDGE losses (contrastive + diversity), forward + backward, for one batch."""
    from utils.method.losses import contrastive_loss, diversity_loss

    u = _meta((batch_size, dim), requires_grad=True)
    v = _meta((batch_size, dim))
    fwd, bwd = count_forward_backward(lambda: contrastive_loss(u, v) + diversity_loss(u, v))
    return fwd + bwd


def edge_step(models: dict, res_latent: int, checkpointing: bool = False):
    """A closure running one EDGE sample end to end: noisy latent -> UNet -> x0 -> decode -> scorer."""
    unet, vae, scorer = models["unet"], models["vae"], models["scorer"]

    def run():
        abar = torch.tensor(0.5, device="meta")
        shape = (1, unet.config.in_channels, res_latent, res_latent)
        z0, eps = _meta(shape), _meta(shape)
        zt = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
        states = _meta((1, TEXT_TOKENS, unet.config.cross_attention_dim))
        eps_hat = unet(zt, torch.full((1,), 500, device="meta"), states).sample
        x0 = (zt - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
        image = vae.decode(x0 / vae.config.scaling_factor).sample
        if image.shape[-1] != SCORER_RESOLUTION:
            image = F.interpolate(image, size=SCORER_RESOLUTION, mode="bilinear", antialias=False)
        return scorer.encode_image(image)

    if checkpointing:
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
        vae.disable_gradient_checkpointing()
    return run


def count_edge_step(models: dict, res_latent: int, checkpointing: bool = False) -> int:
    """Forward + backward FLOPs of one whole EDGE sample (DiffFit UNet), counted in one pass."""
    set_unet_trainable(models["unet"], "difffit")
    models["unet"].train(checkpointing)
    models["vae"].train(checkpointing)  # diffusers checkpoints only in train mode with grad enabled
    try:
        fwd, bwd = count_forward_backward(edge_step(models, res_latent, checkpointing))
    finally:
        models["unet"].disable_gradient_checkpointing()
        models["vae"].disable_gradient_checkpointing()
        models["unet"].requires_grad_(False)
        models["unet"].eval()
        models["vae"].eval()
    return fwd + bwd


def count_all(resolutions, sample_resolution: int, batch_size: int, progress=print) -> dict:
    """Every per-sample count the report needs, keyed by name (and resolution in pixels)."""
    models = build_models()
    text = count_text_encoder(models["text_encoder"])
    scorer = count_scorer(models["scorer"])
    counts = dict(text_encoder=text, scorer=scorer, by_res={},
                  edge_loss_per_step=count_edge_loss(batch_size, models["scorer"].text_projection.shape[1]))
    for res in sorted(set(resolutions) | {sample_resolution, SCORER_RESOLUTION}):
        t0 = time.time()
        lat = res // 8
        unet = count_unet(models["unet"], lat)
        dec_fwd, dec_bwd = count_decoder(models["vae"], lat)
        tiny_fwd, tiny_bwd = count_decoder(models["taesd"], lat)
        enc = count_forward(lambda: models["vae"].encode(_meta((1, 3, res, res))).latent_dist.mean)
        counts["by_res"][res] = dict(
            parts=PartFlops(text_encoder=text, vae_encode=enc, unet_forward=unet["forward"],
                            unet_backward=unet["backward_difffit"], vae_decode_forward=dec_fwd,
                            vae_decode_backward=dec_bwd, scorer_image_forward=scorer["image_forward"],
                            scorer_image_backward=scorer["image_backward"], scorer_text=scorer["text"]),
            unet_backward_full=unet["backward_full"], taesd_forward=tiny_fwd, taesd_backward=tiny_bwd,
            edge_step=count_edge_step(models, lat),
            edge_step_checkpointed=count_edge_step(models, lat, checkpointing=True),
        )
        progress(f"counted {res} px in {time.time() - t0:.1f} s")
    return counts


def parse_args(argv=None) -> argparse.Namespace:
    """Flags of the cost model (a recipe given with --config sets defaults)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mfu", type=float, default=0.35, help="Model FLOP utilisation assumed.")
    parser.add_argument("--mfu_range", type=float, nargs=2, default=[0.25, 0.45], metavar=("LOW", "HIGH"),
                        help="Utilisation range shown beside the central estimate.")
    parser.add_argument("--peak_tflops", type=float, default=A5000_DENSE_FP16_TFLOPS,
                        help="Peak dense throughput of the GPU (RTX A5000 fp16 tensor cores: 111.1).")
    parser.add_argument("--resolution", type=int, default=512, help="Training resolution in pixels.")
    parser.add_argument("--public_resolution", type=int, default=224,
                        help="Second training resolution shown (the public EDGE code trains at 224 px).")
    parser.add_argument("--sample_resolution", type=int, default=512, help="Sampling resolution in pixels.")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=145000, help="Training pairs (Flickr30K: 29k images x 5).")
    parser.add_argument("--train_images", type=int, default=29000, help="Distinct training images.")
    parser.add_argument("--num_images", type=int, default=500, help="Images sampled for the distilled set.")
    parser.add_argument("--steps", type=int, default=50, help="Sampling steps.")
    parser.add_argument("--fast_steps", type=int, default=20, help="Sampling steps of DPM-Solver++ in (d).")
    parser.add_argument("--unet_evals_per_step", type=int, default=2, choices=(1, 2),
                        help="2 with classifier-free guidance, 1 without.")
    args = parse_args_with_recipe(parser, argv)
    for name in ("resolution", "public_resolution", "sample_resolution"):
        value = getattr(args, name)
        if value < 64 or value % 8:
            raise fail(f"--{name} must be a multiple of 8 and at least 64, got {value}")
    for name in ("batch_size", "epochs", "pairs", "train_images", "num_images", "steps", "fast_steps"):
        if getattr(args, name) < 1:
            raise fail(f"--{name} must be >= 1, got {getattr(args, name)}")
    for value in (args.mfu, *args.mfu_range):
        if not 0 < value <= 1:
            raise fail(f"--mfu and --mfu_range must lie in (0, 1], got {value}")
    if args.peak_tflops <= 0:
        raise fail(f"--peak_tflops must be positive, got {args.peak_tflops}")
    return args


def main(args) -> str:
    """Count, print and return the Markdown report."""
    from benchmarks.cost_report import report

    t0 = time.time()
    counts = count_all([args.resolution, args.public_resolution], args.sample_resolution, args.batch_size,
                       progress=lambda msg: print(msg, file=sys.stderr))
    text = report(counts, args)
    print(text)
    print(f"counted in {time.time() - t0:.0f} s", file=sys.stderr)
    return text


if __name__ == "__main__":
    main(parse_args())
