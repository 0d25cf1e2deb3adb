"""Stable Diffusion loading through the real code path, on tiny random-init models."""
import pytest
import torch

from utils.common.errors import InputError
from utils.models.sd_models import load_sd_components, load_sd_pipeline
from utils.models.tiny import build_tiny_sd


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny", resolution=16, unet_channels=(16, 32),
                         vae_channels=(16,))


def test_tiny_sd_roundtrip_keeps_weights(tiny_sd, tmp_path):
    comps = load_sd_components(tiny_sd)
    assert comps.unet.config.sample_size == 16 and comps.noise_scheduler.config.num_train_timesteps == 1000
    # save and load again: identical weights through the same loader
    pipe = load_sd_pipeline(tiny_sd)
    pipe.save_pretrained(tmp_path / "again")
    again = load_sd_components(tmp_path / "again")
    for (n, a), (_, b) in zip(comps.unet.state_dict().items(), again.unet.state_dict().items()):
        assert torch.equal(a, b), n


def test_tiny_sd_pipeline_generates(tiny_sd):
    pipe = load_sd_pipeline(tiny_sd)
    out = pipe(["a red circle"], num_inference_steps=2, height=16, width=16,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 16, 16, 3) and 0.0 <= out.min() and out.max() <= 1.0


def test_missing_model_folder_is_clear(tmp_path):
    (tmp_path / "not_a_pipeline").mkdir()
    with pytest.raises(InputError, match="model_index.json is missing"):
        load_sd_components(tmp_path / "not_a_pipeline")


def test_absent_hub_model_names_what_was_looked_for():
    with pytest.raises(InputError, match="could not load .*nobody/no-such-model.*download") as e:
        load_sd_pipeline("nobody/no-such-model")
    assert "\n" not in str(e.value)
