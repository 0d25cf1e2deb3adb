"""Which UNet parameters the EDGE fine-tuning trains: DiffFit (bias + norm, default), LoRA (peft), full.

DiffFit (Xie et al. 2023) tunes bias terms, normalisation layers, the class embedding and
learnable scale factors it adds to each block. The public EDGE code selects UNet parameters whose
name contains 'bias', 'norm', 'gamma' or 'y_embed'; in a diffusers UNet2DConditionModel only the
first two match (there are no 'gamma' scale factors nor a 'y_embed'), so "difffit" here means:
every bias, plus every parameter of a normalisation layer (GroupNorm, LayerNorm, ...) or with
'norm' in its name. No scale factors are added, so a DiffFit-trained UNet keeps SD's architecture
and saves as a plain `unet/` folder.
"""
import torch

from utils.common.errors import fail

TRAINABLE_SETS = ("difffit", "lora", "full")
NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)
DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def difffit_parameter_names(unet: torch.nn.Module) -> set:
    """Names of the bias and normalisation parameters of `unet`."""
    names = set()
    for mod_name, module in unet.named_modules():
        is_norm = isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "bias" or is_norm or "norm" in mod_name.rsplit(".", 1)[-1]:
                names.add(full)
    return names


def configure_trainable(unet: torch.nn.Module, trainable: str = "difffit", lora_rank: int = 4,
                        lora_alpha: int = None, lora_targets=DEFAULT_LORA_TARGETS) -> list:
    """Freeze `unet` except the chosen set (LoRA adds adapters first); return the trainable parameters."""
    if trainable not in TRAINABLE_SETS:
        raise fail(f"unknown trainable set '{trainable}' (choose from {', '.join(TRAINABLE_SETS)})")
    unet.requires_grad_(False)
    if trainable == "full":
        unet.requires_grad_(True)
    elif trainable == "difffit":
        names = difffit_parameter_names(unet)
        for name, p in unet.named_parameters():
            p.requires_grad_(name in names)
    else:
        from peft import LoraConfig

        if lora_rank < 1:
            raise fail(f"--lora_rank must be >= 1, got {lora_rank}")
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, init_lora_weights="gaussian",
                                    target_modules=list(lora_targets)))
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise fail(f"the trainable set '{trainable}' selects no UNet parameter")
    return params


def count_parameters(module: torch.nn.Module) -> dict:
    """{"trainable": n, "total": n} parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def lora_state_dict(unet) -> dict:
    """The UNet's LoRA weights in diffusers' format (for StableDiffusionPipeline.save_lora_weights)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
