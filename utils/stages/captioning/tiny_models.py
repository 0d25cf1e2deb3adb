"""Tiny random-init LLaVA and Llama folders (saved with save_pretrained) for tests and offline runs.

Their captions are noise; they exercise the real loading and generation code without a hub.
The tokenizer is the MiniLM one shipped by a pip package, with the tokens these models need added.
"""
from pathlib import Path

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

    from utils.models.sd_models import minilm_path

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
