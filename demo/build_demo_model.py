"""Build the small Stable Diffusion that the offline demo starts from (assets/demo_sd), from scratch.

Steps, each through the stage script a user would run by hand:
  1. init: a tiny random-init SD (`utils.models.tiny.build_tiny_sd`: MiniLM text encoder, v-prediction,
     zero-terminal-SNR betas, trailing timestep spacing), made small and fast enough for the demo:
     the pretrained MiniLM keeps its first --text_encoder_layers layers and only the embedding rows of
     the common WordPiece ids plus every token of the data set's captions (tokenization of those
     captions is unchanged), and the no-downsampling VAE drops its mid-block self-attention (at 32 px
     it is 1024 tokens and four fifths of the VAE's cost, and a near-identity VAE does not need it).
  2. VAE pre-training: `python -m demo.pretrain_vae --config configs/demo_vae.yaml`.
  3. UNet pre-training (plain diffusion loss): `edge_diffusion_train.py --config configs/demo_model_build.yaml`,
     then --continue_steps more steps of the same recipe from its result (fresh AdamW state, no warm-up).
  4. export: UNet, VAE and text encoder as fp16 safetensors into --output_dir, a folder that
     `StableDiffusionPipeline.from_pretrained` (and `utils.models.sd_models.load_sd_pipeline`) loads as it is.

Usage:
    python -m demo.build_demo_model --data data/procedural32 --work_dir runs/demo_model --output_dir assets/demo_sd
    python -m demo.build_demo_model --init_only --data data/procedural32 --work_dir runs/x   # step 1 only
    python -m demo.build_demo_model --data data/procedural32 --work_dir runs/mid_model --output_dir runs/mid_sd \
        --vae_from assets/demo_sd --pretrain_steps 1000   # a weaker generator on the shipped VAE
                                                          # (docs/ablation_demo.md)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from dataset.registry import splits_named_by
from utils.common.atomic_io import atomic_write_json
from utils.common.config import parse_args_with_recipe
from utils.common.errors import fail, run_cli

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    """Flags of the demo-model build (a --config recipe sets defaults; flags win)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/procedural32", help="procedural data folder (dataset.procedural output)")
    p.add_argument("--work_dir", default="runs/demo_model", help="intermediate models (init, vae, pretrained)")
    p.add_argument("--output_dir", default="assets/demo_sd", help="the shipped fp16 pipeline folder")
    p.add_argument("--vae_config", default="configs/demo_vae.yaml")
    p.add_argument("--pretrain_config", default="configs/demo_model_build.yaml")
    p.add_argument("--unet_channels", type=int, nargs="+", default=[64, 128, 128],
                   help="UNet block widths; cross-attention in every block but the first")
    p.add_argument("--vae_channels", type=int, nargs="+", default=[32, 64],
                   help="VAE block widths; n blocks downsample by 2**(n-1) (two: 32 px images -> 16x16 latents)")
    p.add_argument("--text_encoder_layers", type=int, default=2, help="MiniLM layers kept (of 6)")
    p.add_argument("--keep_vocab_below", type=int, default=1996,
                   help="also keep all WordPiece ids below this (1996: special tokens and characters)")
    p.add_argument("--vae_steps", type=int, default=3000,
                   help="VAE steps (the recipe's 500 are the from-scratch demo's; the shipped model used 3000)")
    p.add_argument("--vae_from", default=None,
                   help="a pipeline folder whose trained VAE replaces step 2 (e.g. assets/demo_sd: a UNet rebuilt "
                        "for fewer steps on the shipped VAE)")
    p.add_argument("--pretrain_steps", type=int, default=None,
                   help="override the pre-training recipe's max_train_steps")
    p.add_argument("--continue_steps", type=int, default=0,
                   help="then continue pre-training this many steps with the same recipe (fresh optimizer, no "
                        "warm-up, seed + 1); 0 (the shipped model): export after the first run")
    p.add_argument("--init_only", action="store_true", help="stop after step 1 (the from-scratch demo path)")
    p.add_argument("--seed", type=int, default=0)
    args = parse_args_with_recipe(p, argv)
    if args.vae_from and not (Path(args.vae_from) / "vae" / "config.json").is_file():
        raise fail(f"--vae_from {args.vae_from}: no vae/config.json there (a diffusers pipeline folder is needed)")
    if not 1 <= args.text_encoder_layers <= 6:
        raise fail(f"--text_encoder_layers must be 1..6 (MiniLM-L6), got {args.text_encoder_layers}")
    return args


# ---------------------------------------------------------------- step 1: a small initial model

def caption_token_ids(tokenizer, data_dir) -> set:
    """Every WordPiece id that the captions of the split annotation files use (in data_dir/annotations or data_dir).

    Only files whose names name a split ("procedural_train.json", "test.json") are read: side files such as
    procedural_attributes.json or procedural_noisy_captions.json are not annotation lists.
    """
    ann_dir = Path(data_dir) / "annotations"
    if not ann_dir.is_dir():
        ann_dir = Path(data_dir)
    files = sorted(ann_dir.glob("*.json")) if ann_dir.is_dir() else []
    files = [f for f in files if splits_named_by(f)]
    if not files:
        raise fail(f"{ann_dir}: no annotation files (make the data with `python -m dataset.procedural`)")
    captions = set()
    for f in files:
        try:
            entries = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise fail(f"{f} is not valid JSON: {e}")
        for i, e in enumerate(entries):
            cap = e.get("caption") if isinstance(e, dict) else None
            if cap is None:
                raise fail(f"{f}: entry {i} has no 'caption'")
            captions.update(cap if isinstance(cap, list) else [cap])
    ids = set()
    for ids_one in tokenizer(sorted(captions)).input_ids:
        ids.update(ids_one)
    return ids


def shrink_text_encoder(pipeline_dir, data_dir, num_layers: int, keep_vocab_below: int) -> dict:
    """Keep the first `num_layers` BERT layers and the embedding rows of kept ids; rewrite encoder + tokenizer.

    Kept ids: all ids below `keep_vocab_below` (special tokens, single characters), the ASCII
    continuation pieces "##x" (so any ASCII text still tokenizes, letter by letter if need be) and
    every id the data set's captions use. WordPiece is greedy longest
    match, so a caption whose pieces are all kept tokenizes into the same pieces as before.
    """
    from transformers import AutoModel, AutoTokenizer, BertTokenizer

    pipeline_dir = Path(pipeline_dir)
    tokenizer = AutoTokenizer.from_pretrained(pipeline_dir / "tokenizer")
    encoder = AutoModel.from_pretrained(pipeline_dir / "text_encoder")
    if encoder.config.model_type != "bert":
        raise fail(f"{pipeline_dir}/text_encoder is a {encoder.config.model_type}, expected the MiniLM (bert)")
    vocab = tokenizer.get_vocab()
    continuation_chars = {i for t, i in vocab.items() if len(t) == 3 and t.startswith("##") and t[2].isascii()}
    keep = sorted(set(range(min(keep_vocab_below, tokenizer.vocab_size))) | continuation_chars
                  | caption_token_ids(tokenizer, data_dir))
    tokens = tokenizer.convert_ids_to_tokens(keep)
    small_tok = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True,
                              model_max_length=tokenizer.model_max_length)
    config = encoder.config
    config.vocab_size = len(keep)
    config.num_hidden_layers = num_layers
    config.pad_token_id = tokens.index(tokenizer.pad_token)
    small = type(encoder)(config)
    state = encoder.state_dict()
    index = torch.tensor(keep)
    state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"][index]
    missing, unexpected = small.load_state_dict(state, strict=False)
    if missing:
        raise fail(f"shrinking the text encoder left weights unset: {missing[:5]}")
    shutil.rmtree(pipeline_dir / "text_encoder")
    shutil.rmtree(pipeline_dir / "tokenizer")
    small.save_pretrained(pipeline_dir / "text_encoder")
    small_tok.save_pretrained(pipeline_dir / "tokenizer")
    return {"vocab": len(keep), "layers": num_layers, "params": sum(p.numel() for p in small.parameters()),
            "dropped_weights": len(unexpected)}


def drop_vae_attention(pipeline_dir) -> int:
    """Rebuild the VAE without mid-block attention (same other weights); returns its parameter count."""
    from diffusers import AutoencoderKL

    folder = Path(pipeline_dir) / "vae"
    vae = AutoencoderKL.from_pretrained(folder)
    config = dict(vae.config)
    config["mid_block_add_attention"] = False
    small = AutoencoderKL.from_config(config)
    small.load_state_dict({k: v for k, v in vae.state_dict().items() if k in small.state_dict()})
    shutil.rmtree(folder)
    small.save_pretrained(folder)
    return sum(p.numel() for p in small.parameters())


def init_model(out_dir, data_dir, unet_channels=(64, 128, 128), text_encoder_layers: int = 2,
               keep_vocab_below: int = 1996, seed: int = 0, vae_channels=(32, 64)) -> Path:
    """Step 1: tiny random-init SD with the shrunk MiniLM and an attention-free VAE, saved to `out_dir`."""
    from utils.models.tiny import build_tiny_sd

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    build_tiny_sd(out_dir, 32, "minilm", tuple(unet_channels), tuple(vae_channels), prediction_type="v_prediction",
                  zero_snr=True, seed=seed)
    info = shrink_text_encoder(out_dir, data_dir, text_encoder_layers, keep_vocab_below)
    info["vae_params"] = drop_vae_attention(out_dir)
    print(f"initial model in {out_dir}: {json.dumps(info)}")
    return out_dir


def reuse_vae(init_dir, vae_from, out_dir) -> Path:
    """Step 2 without training: the initial model with `vae_from`'s trained VAE (in fp32), saved to `out_dir`."""
    from diffusers import AutoencoderKL

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(init_dir, out_dir)
    shutil.rmtree(out_dir / "vae")
    AutoencoderKL.from_pretrained(Path(vae_from) / "vae", torch_dtype=torch.float32).save_pretrained(out_dir / "vae")
    print(f"[build] VAE of {vae_from} reused in {out_dir}")
    return out_dir


# ---------------------------------------------------------------- step 4: export

def export_fp16(model_dir, output_dir) -> int:
    """Save the pipeline with fp16 weights (safetensors) into `output_dir`; returns its size in bytes."""
    from utils.models.sd_models import load_sd_pipeline

    pipe = load_sd_pipeline(str(model_dir), torch_dtype=torch.float16)
    output_dir = Path(output_dir)
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    return sum(f.stat().st_size for f in output_dir.rglob("*") if f.is_file())


def pipeline_from_checkpoint(checkpoint, base_model, output_dir, use_ema: bool = True) -> Path:
    """A loadable pipeline folder from a training checkpoint: `base_model`'s VAE/text encoder + the checkpoint's UNet.

    With `use_ema` the EMA weights (accelerate's custom_checkpoint_0.pkl, written with --use_ema) replace the
    raw ones, as the final export does. Used to measure prompt following along a long pre-training.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from utils.models.sd_models import load_sd_pipeline

    checkpoint = Path(checkpoint)
    if not (checkpoint / "unet").is_dir():
        raise fail(f"{checkpoint} holds no unet/ folder (not a full/DiffFit training checkpoint)")
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    ema_file = checkpoint / "custom_checkpoint_0.pkl"
    if use_ema:
        if not ema_file.is_file():
            raise fail(f"{ema_file} not found: the run was not trained with --use_ema (pass use_ema=False)")
        ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)
        ema.load_state_dict(torch.load(ema_file, map_location="cpu", weights_only=False))
        ema.copy_to(unet.parameters())
    pipe = load_sd_pipeline(str(base_model), unet=unet)
    pipe.save_pretrained(output_dir)
    return Path(output_dir)


def _run(cmd) -> None:
    cmd = [str(c) for c in cmd]
    print("[build] " + " ".join(cmd[1:]), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
        raise RuntimeError(f"step failed: {' '.join(cmd[1:])}")


def _run_step(cmd, out_dir, build_record: dict, input_remade: bool = False) -> bool:
    """Run one training step into `out_dir`, unless it finished there before with the same command and build options
    and its input was not remade by this run (`input_remade`: an earlier step ran). Returns whether it ran.

    A marker written after the step marks it finished, so an interrupted build resumes at the first unfinished
    step (the steps take 15-30 min each on 2 cores); any other option or command re-runs the step.
    """
    marker = Path(out_dir) / ".build_step.json"
    record = {"cmd": [str(c) for c in cmd[1:]], "build": build_record}
    if marker.is_file():
        try:
            done = json.loads(marker.read_text(encoding="utf-8")) == record
        except json.JSONDecodeError:
            done = False
        if done and not input_remade:
            print(f"[build] {out_dir}: finished by an earlier run with the same options, kept", flush=True)
            return False
        marker.unlink()
    _run(cmd)
    atomic_write_json(marker, record)
    return True


def main(args) -> Path:
    """Run the build; returns the shipped folder (or the initial model with --init_only)."""
    work = Path(args.work_dir)
    init = init_model(work / "init", args.data, args.unet_channels, args.text_encoder_layers,
                      args.keep_vocab_below, args.seed, args.vae_channels)
    if args.init_only:
        return init
    data = ["--dataset", "procedural", "--ann_root", args.data, "--seed", args.seed, "--overwrite_output_dir"]
    vae_steps = ["--max_train_steps", args.vae_steps] if args.vae_steps else []
    pre_steps = (["--max_train_steps", args.pretrain_steps, "--checkpointing_steps", "0", "--validation_steps", "0"]
                 if args.pretrain_steps else [])
    build = {k: str(v) for k, v in sorted(vars(args).items()) if k != "output_dir"}
    ran = False  # a step that ran remakes the next one's input: the steps after it run again too
    if args.vae_from:
        reuse_vae(init, args.vae_from, work / "vae")
    else:
        ran = _run_step([sys.executable, "-m", "demo.pretrain_vae", "--config", args.vae_config, *data,
                   "--pretrained_model_name_or_path", init, "--output_dir", work / "vae", *vae_steps], work / "vae", build)
    ran = _run_step([sys.executable, "edge_diffusion_train.py", "--config", args.pretrain_config, *data,
                     "--pretrained_model_name_or_path", work / "vae", "--output_dir", work / "pretrained", *pre_steps],
                    work / "pretrained", build, ran)
    final = work / "pretrained"
    if args.continue_steps:
        final = work / "continued"
        _run_step([sys.executable, "edge_diffusion_train.py", "--config", args.pretrain_config, *data[:-3],
                   "--seed", args.seed + 1, "--overwrite_output_dir", "--pretrained_model_name_or_path",
                   work / "pretrained", "--output_dir", final, "--max_train_steps", args.continue_steps,
                   "--lr_warmup_steps", "0", "--checkpointing_steps", "200", "--validation_steps", "0"], final, build, ran)
    size = export_fp16(final, args.output_dir)
    print(f"[build] {args.output_dir}: {size / 2**20:.1f} MiB")
    return Path(args.output_dir)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
