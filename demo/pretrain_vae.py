"""Pre-train the VAE of a (tiny) Stable Diffusion as an autoencoder, so that a random-init VAE reconstructs.

The offline demo's model build runs it before the UNet's pre-training. The loss is the reconstruction's
pixel MSE plus a small KL term (AdamW, one process); at the end the latent scaling factor is re-estimated
and the pipeline is saved with the new VAE (utils/stages/vae_pretrain.py).

Usage:
    python -m demo.pretrain_vae --config configs/demo_vae.yaml
    python -m demo.pretrain_vae --pretrained_model_name_or_path runs/demo_model/init --dataset procedural \\
        --ann_root data/procedural32 --output_dir runs/demo_model/vae --resolution 32 --max_train_steps 500
"""
import argparse
import sys

from utils.common.config import parse_args_with_recipe
from utils.common.errors import run_cli
from utils.common.precision import PRECISIONS
from utils.stages.train_data import add_data_flags, check_common_flags


def build_parser() -> argparse.ArgumentParser:
    """The flags `utils.stages.vae_pretrain.pretrain_vae` reads (defaults as in edge_diffusion_train.py)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    add_data_flags(a)
    a("--train_batch_size", type=int, default=16)
    a("--num_train_epochs", type=int, default=10, help="passes over the training images")
    a("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    a("--learning_rate", type=float, default=1e-3, help="AdamW learning rate")
    a("--weight_decay", type=float, default=0.0)
    a("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    a("--vae_kl_weight", type=float, default=1e-6, help="weight of the KL term beside the pixel MSE")
    a("--mixed_precision", choices=PRECISIONS, default=None,
      help="default: accelerate's config (no); see edge_diffusion_train.py --help for auto")
    a("--logging_dir", default="logs", help="relative to --output_dir (train_log.jsonl)")
    a("--seed", type=int, default=0)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse flags (a --config recipe sets defaults) and validate them."""
    args = parse_args_with_recipe(build_parser(), argv)
    check_common_flags(args)
    return args


def main(args):
    """Pre-train the VAE and return the output folder (the whole pipeline with the new VAE)."""
    from utils.common.atomic_io import check_output_dir
    from utils.stages.vae_pretrain import pretrain_vae

    check_output_dir(args.output_dir)  # a file or a read-only folder: one line before any model loads
    return pretrain_vae(args)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
