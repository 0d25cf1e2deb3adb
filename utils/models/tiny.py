"""Tiny random-init models saved as ordinary folders, for tests, benchmarks and the offline demo.

Stable Diffusion (`build_tiny_sd`, also `python -m utils.models.tiny --output_dir DIR`), transformers CLIP,
TAESD-style AutoencoderTiny, LLaVA, Llama, BERT and NFNet. Their outputs are noise; they exercise the real
loading, training and generation code without a hub. Tokenizers are the MiniLM one shipped by a pip package.
"""
from pathlib import Path

import torch

from utils.common.errors import fail
from utils.models.encoders import minilm_path
from utils.models.scorers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

TINY_NFNET_ARGS = dict(depths=(1, 1, 1, 1), channels=(16, 32, 48, 64), group_size=8, stem_chs=16, num_features=64)

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
LLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}")


def _tokenizer(extra_tokens=()):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    if extra_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    return tok


def _tiny_llama_config(vocab_size, pad_token_id):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=pad_token_id, bos_token_id=None, eos_token_id=None)


def build_tiny_llava(output_dir, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> Path:
    """Save a random LLaVA (tiny CLIP vision tower + tiny Llama) and its processor to `output_dir`."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    out = Path(output_dir)
    tok = _tokenizer(["<image>"])
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=_tiny_llama_config(len(tok), tok.pad_token_id),
                         image_token_index=image_token_id, vision_feature_select_strategy="default",
                         vision_feature_layer=-2, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>", chat_template=LLAVA_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out


def build_tiny_llama(output_dir, seed: int = 0) -> Path:
    """Save a random tiny LlamaForCausalLM and a tokenizer with a chat template to `output_dir`."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(output_dir)
    tok = _tokenizer()
    tok.chat_template = LLAMA_CHAT_TEMPLATE
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_tiny_llama_config(len(tok), tok.pad_token_id))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_unet_config(sample_size=32, in_channels=4, cross_attention_dim=32, block_out_channels=(32, 64),
                     layers_per_block=1, attention_head_dim=8) -> dict:
    """A small UNet2DConditionModel config (cross-attention in every block but the first)."""
    n = len(block_out_channels)
    return dict(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=list(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
        cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
        norm_num_groups=min(8, block_out_channels[0]),
    )


def tiny_vae_config(block_out_channels=(32,), latent_channels=4) -> dict:
    """A small AutoencoderKL config; one block means no downsampling (latent = image size)."""
    n = len(block_out_channels)
    return dict(in_channels=3, out_channels=3, latent_channels=latent_channels,
                block_out_channels=list(block_out_channels), layers_per_block=1,
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                norm_num_groups=min(8, block_out_channels[0]))


def build_tiny_sd(output_dir, resolution=32, text_encoder="tiny-clip", unet_channels=(32, 64),
                  vae_channels=(32,), latent_channels=4, prediction_type="epsilon",
                  zero_snr=False, seed=0) -> Path:
    """Build a random-init Stable Diffusion pipeline and save it as a diffusers folder.

    text_encoder: "tiny-clip" (random CLIPTextModel on the MiniLM WordPiece vocabulary) or
    "minilm" (the pretrained MiniLM from pip, 384-d token states). The folder loads with
    `load_sd_components` / `StableDiffusionPipeline.from_pretrained` like any SD checkpoint.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.model_max_length = 32
    if text_encoder == "minilm":
        encoder = AutoModel.from_pretrained(minilm_path())
    elif text_encoder == "tiny-clip":
        encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id))
    else:
        raise fail(f"unknown tiny text encoder '{text_encoder}' (choose tiny-clip or minilm)")
    vae = AutoencoderKL(**tiny_vae_config(vae_channels, latent_channels))
    factor = 2 ** (len(vae_channels) - 1)
    unet = UNet2DConditionModel(**tiny_unet_config(resolution // factor, latent_channels,
                                                   encoder.config.hidden_size, unet_channels))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False,
                              steps_offset=1,
                              rescale_betas_zero_snr=zero_snr,
                              timestep_spacing="trailing" if zero_snr else "leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    output_dir = Path(output_dir)
    pipe.save_pretrained(output_dir)
    return output_dir


def build_tiny_hf_clip(output_dir, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32,
                       projection_dim: int = 32, seed: int = 0):
    """Save a random-init transformers CLIPModel with the MiniLM WordPiece tokenizer (tests, offline demo)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.model_max_length = 32
    text = dict(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                  intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD)).save_pretrained(output_dir)
    return output_dir


def build_tiny_autoencoder(output_dir, latent_channels: int = 4, upsamplings: int = 3, channels: int = 16,
                           taesd_layout: bool = False, seed: int = 0) -> Path:
    """Save a random-init AutoencoderTiny with `upsamplings` x2 steps (tests and benchmarks only).

    taesd_layout: TAESD's block counts (decoder 3,...,3,1; encoder 1,3,...,3) instead of one block per stage.
    """
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    n = upsamplings + 1
    blocks = (channels,) * n
    enc, dec = ((1,) + (3,) * upsamplings, (3,) * upsamplings + (1,)) if taesd_layout else ((1,) * n, (1,) * n)
    tiny = AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=blocks,
                           decoder_block_out_channels=blocks, num_encoder_blocks=enc, num_decoder_blocks=dec)
    tiny.save_pretrained(output_dir)
    return Path(output_dir)


def save_tiny_bert(folder) -> Path:
    """A 2-layer random BERT with MiniLM's (BERT uncased) tokenizer, saved with save_pretrained."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=128))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def save_tiny_nfnet(folder) -> Path:
    """A tiny random NFNet (nfnet_l0 blocks, fewer/narrower stages) saved with timm's save_for_hf."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("nfnet_l0", pretrained=False, num_classes=0, **TINY_NFNET_ARGS)
    save_for_hf(model, str(folder), model_args=TINY_NFNET_ARGS)
    return Path(folder)


def _main(argv=None):
    """CLI: python -m utils.models.tiny --output_dir DIR [--resolution 32] [--text_encoder tiny-clip|minilm]."""
    import argparse

    p = argparse.ArgumentParser(description="Build a tiny random-init Stable Diffusion folder.")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--text_encoder", choices=["tiny-clip", "minilm"], default="tiny-clip")
    p.add_argument("--unet_channels", type=int, nargs="+", default=[32, 64])
    p.add_argument("--vae_channels", type=int, nargs="+", default=[32])
    p.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon")
    p.add_argument("--zero_snr", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = build_tiny_sd(a.output_dir, a.resolution, a.text_encoder, tuple(a.unet_channels), tuple(a.vae_channels),
                        prediction_type=a.prediction_type, zero_snr=a.zero_snr, seed=a.seed)
    print(f"tiny Stable Diffusion written to {out}")


if __name__ == "__main__":
    _main()
