"""python -m demo.pretrain_vae (VAE pre-training of the offline demo) on a tiny model."""
import json
import os

import pytest
import torch

from demo import pretrain_vae as script
from utils.common.errors import InputError

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def assets(tiny_train_assets):
    return tiny_train_assets("vae_assets")


def _argv(assets, out, *extra):
    return ["--pretrained_model_name_or_path", assets["sd"], "--dataset", "procedural", "--ann_root", assets["data"],
            "--output_dir", str(out), "--resolution", "32", "--seed", "3", *extra]


def test_vae_is_trained_and_saved_with_a_new_scaling_factor(assets, tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "vae"
    script.main(script.parse_args(_argv(assets, out, "--train_batch_size", "4", "--max_train_steps", "4",
                                        "--learning_rate", "1e-3")))
    vae = AutoencoderKL.from_pretrained(out, subfolder="vae")
    base = AutoencoderKL.from_pretrained(assets["sd"], subfolder="vae")
    assert vae.config.scaling_factor != base.config.scaling_factor
    assert any(not torch.equal(a, b) for a, b in zip(vae.state_dict().values(), base.state_dict().values()))
    assert (out / "logs" / "vae_reconstructions.png").is_file()
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # a second run into the same folder needs --overwrite_output_dir (there are no checkpoints to resume)
    with pytest.raises(InputError, match="--overwrite_output_dir to replace it") as e:
        script.main(script.parse_args(_argv(assets, out, "--max_train_steps", "1")))
    assert "--resume_from_checkpoint" not in str(e.value)


def test_only_the_vae_flags_are_accepted(assets, tmp_path):
    with pytest.raises(SystemExit):  # an EDGE flag is not one of VAE pre-training's
        script.parse_args(_argv(assets, tmp_path / "o", "--lambda_contrastive", "1"))
    with pytest.raises(InputError, match="--output_dir is required"):
        script.parse_args(["--ann_root", assets["data"]])
