"""Gradients reach only the chosen trainable UNet parameters (DiffFit, LoRA, full)."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from utils.common.errors import InputError
from utils.method.trainable_params import configure_trainable, difffit_parameter_names, lora_state_dict
from utils.models.tiny import tiny_unet_config


def _unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config(sample_size=8, block_out_channels=(16, 32)))


def _backward(unet):
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32)).sample
    out.pow(2).mean().backward()


@pytest.mark.parametrize("which", ["difffit", "lora", "full"])
def test_gradients_reach_only_trainable(which):
    torch.set_num_threads(1)
    unet = _unet()
    params = configure_trainable(unet, which, lora_rank=2)
    chosen = {id(p) for p in params}
    _backward(unet)
    named = dict(unet.named_parameters())
    with_grad = {n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad, "no parameter received a gradient"
    assert all(id(named[n]) in chosen for n in with_grad)
    assert all(named[n].grad is None for n in named if id(named[n]) not in chosen)
    if which == "difffit":
        assert with_grad <= difffit_parameter_names(unet)
        assert all(n.endswith("bias") or "norm" in n for n in with_grad)
        assert any("norm" in n for n in with_grad) and any(n.endswith("bias") for n in with_grad)
        assert len(params) < len(named)
    elif which == "lora":
        assert all("lora_" in n for n in with_grad)
        state = lora_state_dict(unet)
        assert state and all("lora" in k for k in state)
    else:
        assert len(params) == len(named)


def test_unknown_set():
    with pytest.raises(InputError):
        configure_trainable(_unet(), "bitfit")
