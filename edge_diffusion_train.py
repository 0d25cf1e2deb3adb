"""Stage 1: fine-tune Stable Diffusion with the EDGE losses (bi-directional contrastive + diversity).

The UNet is trained (DiffFit bias/norm parameters by default, or LoRA, or all weights) so that
images decoded from its denoised estimate match their captions under a frozen scorer (CLIP) and
differ from each other; the VAE, text encoder and scorer stay frozen. The output folder loads with
`StableDiffusionPipeline.from_pretrained` (LoRA: the base model + `load_lora_weights(output_dir)`).
VAE pre-training (offline demo) has its own entry point: `python -m demo.pretrain_vae`.

Usage:
  accelerate launch edge_diffusion_train.py --config configs/train_flickr30k.yaml \\
      --ann_root data/flickr30k_ann --image_root data/flickr30k --output_dir runs/edge_flickr30k
  python edge_diffusion_train.py --pretrained_model_name_or_path runs/tiny_sd --dataset procedural \\
      --ann_root data/procedural --output_dir runs/edge_demo --scorer retrieval:runs/scorer \\
      --max_train_steps 200 --resume_from_checkpoint latest
  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
      --mixed_precision no --dynamo_backend no edge_diffusion_train.py ... --gather_features
"""
import argparse
import sys

from dataset.torch_datasets import EPOCH_UNITS
from utils.common.config import parse_args_with_recipe
from utils.common.errors import fail, run_cli
from utils.common.precision import PRECISIONS
from utils.method.losses import DIVERSITY_MODES
from utils.method.trainable_params import TRAINABLE_SETS
from utils.models.cheap_decode import SCORER_DECODE_MODES, check_decode_flags
from utils.stages.latent_cache import check_cacheable
from utils.stages.train_data import add_data_flags, check_common_flags

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def build_parser() -> argparse.ArgumentParser:
    """All flags (diffusers train_text_to_image.py names where they exist)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    _data_flags(a)
    _optimisation_flags(a)
    _objective_flags(a)
    _run_flags(a)
    return p


def _data_flags(a) -> None:
    """Model, data and preprocessing (shared with VAE pre-training), and caption dropout."""
    add_data_flags(a)
    a("--caption_dropout", type=float, default=0.0,
      help="probability of an empty UNet caption (classifier-free guidance); such items count in the MSE term only "
           "and are left out of the contrastive and diversity terms (their sample was not conditioned on the caption)")


def _optimisation_flags(a) -> None:
    """Batch, epochs, optimizer, precision, memory options, trainable set."""
    a("--train_batch_size", type=int, default=16, help="per process")
    a("--num_train_epochs", type=int, default=10)
    a("--epoch_unit", choices=EPOCH_UNITS, default="pairs",
      help="what one epoch passes over: pairs = every (image, caption) pair once (the public EDGE code; 5 per "
           "image on Flickr30K/COCO, so a batch may hold one image twice), images = every image once with one "
           "caption drawn per epoch")
    a("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", action="store_true",
      help="recompute UNet (and, with the EDGE losses, VAE decoder) activations in the backward: less memory, "
           "more time")
    a("--channels_last", action="store_true", help="UNet and VAE in channels-last memory format (faster convs on GPUs)")
    a("--compile", action="store_true", help="torch.compile the UNet and the VAE decoder (slow first steps)")
    a("--cache_latents", action="store_true",
      help="encode every training image once and sample its latent from the cached posterior (mean, std) each "
           "step; with --random_flip both mirror images are cached; not with --random_crop")
    a("--optimizer", choices=("sgd", "adamw"), default="sgd")
    a("--learning_rate", type=float, default=1e-3)
    a("--sgd_momentum", type=float, default=0.0)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--weight_decay", type=float, default=0.0)
    a("--lr_scheduler", choices=LR_SCHEDULERS, default="constant")
    a("--lr_warmup_steps", type=int, default=0)
    a("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    a("--mixed_precision", choices=PRECISIONS, default=None,
      help="default: accelerate's config (no); auto: bf16 on CUDA (fp16 if unsupported) and on CPUs with "
           "native bf16, else fp32 (emulated bf16 is ~20x slower)")
    a("--use_ema", action="store_true")
    a("--ema_decay", type=float, default=0.9999)
    a("--trainable", choices=TRAINABLE_SETS, default="difffit")
    a("--lora_rank", type=int, default=4)


def _objective_flags(a) -> None:
    """The EDGE objective: scorer, loss weights, timesteps, decode for the scorer."""
    a("--scorer", default="open_clip:ViT-B-32/openai",
      help="open_clip:<model>/<tag or file> | hf_clip:<id or folder> | retrieval:<folder>; "
           "several joined by + are an ensemble (mean cosine of the members)")
    a("--lambda_contrastive", type=float, default=1.0)
    a("--lambda_diversity", type=float, default=1.0)
    a("--lambda_mse", type=float, default=0.0, help="weight of the plain diffusion loss (0 in the paper)")
    a("--temperature", type=float, default=0.1)
    a("--t_min", type=int, default=0, help="smallest training timestep")
    a("--t_max", type=int, default=None, help="largest training timestep (default: num_train_timesteps - 1)")
    a("--edge_t_min", type=int, default=None,
      help="EDGE terms on their own timestep range (e.g. 500: high noise, where the x0 estimate does not already "
           "hold the real image's shape) through a second UNet forward; the MSE term keeps --t_min..--t_max. "
           "Default: the MSE term's draw (one forward, as in the paper)")
    a("--edge_t_max", type=int, default=None, help="upper end of --edge_t_min's range (default: --t_max)")
    a("--x0_unroll_steps", type=int, default=0,
      help="K > 0: the EDGE terms score the x0 of a K-step DDIM chain from pure noise (as sampling makes images, "
           "gradients through every step) instead of the one-step estimate from the noised real latent")
    a("--hard_negative_batches", action="store_true",
      help="cut each batch from one k-means cluster of the scorer's caption features (about two batches of "
           "images per cluster, reclustered every epoch), so the contrastive term's negatives are near misses")
    a("--same_caption_positives", action="store_true",
      help="identical captions in a batch (equal scorer text features) count as each other's matches in the "
           "contrastive term, instead of as negatives")
    a("--scorer_shift", type=float, default=0.0,
      help="the scorer reads each decoded x0 estimate translated by a random offset of up to this share of its "
           "side (edges repeated; differentiable augmentation against fitting the one scorer's pixel quirks)")
    a("--edge_guidance_scale", type=float, default=1.0,
      help="w != 1: the EDGE terms score the classifier-free guided prediction uncond + w * (cond - uncond) (an "
           "extra UNet forward on the empty caption), as sampling at that guidance scale draws; 1: the "
           "conditional prediction only (the paper)")
    a("--edge_guidance_frozen_uncond", action="store_true",
      help="with --edge_guidance_scale: the guided prediction's unconditional part carries no gradient, so the "
           "EDGE terms move the trainable set through the conditional prediction only")
    a("--diversity_on", choices=DIVERSITY_MODES, default="image_text",
      help="image_text: joint [image, text] vector per pair (public code); image_text_stacked: 2B points, "
           "without each image's similarity to its own caption; image")
    a("--gather_features", action="store_true", help="contrastive/diversity over the features of all processes")
    a("--x0_clamp", type=float, default=None, help="clamp the denoised latent estimate to [-c, c]")
    a("--scorer_decode", choices=SCORER_DECODE_MODES, default="full",
      help="full: decode x0 with the VAE at its size; reduced: resize the latent so its decode has the scorer's "
           "input size (approximation); tiny: decode with --tiny_vae (approximation)")
    a("--tiny_vae", default=None, help="AutoencoderTiny folder for --scorer_decode tiny (e.g. a local TAESD copy)")


def _run_flags(a) -> None:
    """Checkpoints, logging, validation grids, seed."""
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint-<step> folder')
    a("--validation_prompts", nargs="+", default=None)
    a("--validation_steps", type=int, default=500)
    a("--validation_inference_steps", type=int, default=25)
    a("--validation_guidance_scale", type=float, default=7.5)
    a("--report_to", choices=("tensorboard", "none"), default="tensorboard")
    a("--logging_dir", default="logs", help="relative to --output_dir")
    a("--seed", type=int, default=0)


def validate_args(args) -> None:
    """Checks that need no file access; one-line InputError each."""
    check_common_flags(args)
    if args.gradient_accumulation_steps < 1:
        raise fail(f"--gradient_accumulation_steps must be at least 1, got {args.gradient_accumulation_steps}")
    if args.temperature <= 0:
        raise fail(f"--temperature must be positive, got {args.temperature}")
    if min(args.lambda_contrastive, args.lambda_diversity, args.lambda_mse) < 0:
        raise fail("loss weights (--lambda_*) must be non-negative")
    if args.lambda_contrastive == 0 and args.lambda_diversity == 0 and args.lambda_mse == 0:
        raise fail("all loss weights are 0: set --lambda_contrastive, --lambda_diversity or --lambda_mse")
    if not 0 <= args.caption_dropout < 1:
        raise fail(f"--caption_dropout must be in [0, 1), got {args.caption_dropout}")
    if args.x0_clamp is not None and args.x0_clamp <= 0:
        raise fail(f"--x0_clamp must be positive, got {args.x0_clamp}")
    check_decode_flags(args.scorer_decode, args.tiny_vae)
    if args.cache_latents:
        check_cacheable(args.center_crop)
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise fail("--checkpoints_total_limit must be at least 1")


def parse_args(argv=None) -> argparse.Namespace:
    """Parse flags (a --config recipe sets defaults) and validate them."""
    from utils.common.config import add_paper_flags  # the public EDGE code's flag names (README)

    args = parse_args_with_recipe(add_paper_flags(build_parser(), "train"), argv)
    validate_args(args)
    return args


def main(args):
    """Train and return the output folder."""
    from utils.common.atomic_io import check_output_dir

    check_output_dir(args.output_dir)  # a file or a read-only folder: one line before any model loads
    from utils.stages.training import train

    return train(args)


def _cli() -> int:
    from utils.stages.training import TrainingDiverged

    return run_cli(main, parse_args, errors=(TrainingDiverged,))


if __name__ == "__main__":
    sys.exit(_cli())
