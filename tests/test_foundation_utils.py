"""Atomic I/O, seeding and recipe handling."""
import argparse
import json

import pytest
import torch

from utils.common.atomic_io import append_jsonl, atomic_write_json, read_jsonl
from utils.common.config import parse_args_with_recipe, save_run_config
from utils.common.errors import InputError
from utils.common.seeding import derive_seed, item_generator


def test_atomic_write_json_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a" / "x.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"k": [1, 2]}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]


def test_read_jsonl_skips_truncated_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    append_jsonl(path, {"i": 0})
    append_jsonl(path, {"i": 1})
    with open(path, "a") as f:
        f.write('{"i": 2, "capt')  # a write killed halfway
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}]


def test_read_jsonl_rejects_corruption_in_the_middle(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"i": 0}\nnot json\n{"i": 2}\n')
    with pytest.raises(json.JSONDecodeError):
        read_jsonl(path)


def test_derive_seed_depends_on_seed_and_index_only():
    assert derive_seed(0, 5) == derive_seed(0, 5)
    assert len({derive_seed(0, i) for i in range(1000)}) == 1000
    assert derive_seed(0, 1) != derive_seed(1, 0)
    a = torch.randn(4, generator=item_generator(3, 7))
    b = torch.randn(4, generator=item_generator(3, 7))
    assert torch.equal(a, b)


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    return p


def test_recipe_sets_defaults_and_flags_win(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 0.5\noptimizer: adamw\n")
    args = parse_args_with_recipe(_parser(), ["--config", str(recipe), "--learning_rate", "0.25"])
    assert args.learning_rate == 0.25 and args.optimizer == "adamw"
    out = save_run_config(args, tmp_path / "run")
    saved = json.loads(out.read_text())
    assert saved["args"]["learning_rate"] == 0.25 and "code_version" in saved


def test_recipe_unknown_key_names_file_and_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 0.5\n")
    with pytest.raises(InputError, match=r"r\.yaml.*learning_rat"):
        parse_args_with_recipe(_parser(), ["--config", str(recipe)])


def test_missing_recipe_is_one_line_error(tmp_path):
    with pytest.raises(InputError, match="config file not found") as e:
        parse_args_with_recipe(_parser(), ["--config", str(tmp_path / "nope.yaml")])
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- recipe values (issue 15)


def _train_parser():
    from edge_diffusion_train import build_parser

    return build_parser()


@pytest.mark.parametrize("line, match", [
    ("optimizer: adam", r"r\.yaml: optimizer: invalid choice: 'adam'"),
    ("mixed_precision: fp8", r"r\.yaml: mixed_precision: invalid choice: 'fp8'"),
    ("train_batch_size: 2.5", r"r\.yaml: train_batch_size: invalid int value: '2.5'"),
    ("learning_rate: fast", r"r\.yaml: learning_rate: invalid float value: 'fast'"),
    ("mixed_precision: no", r"r\.yaml: mixed_precision: got the YAML boolean false; quote"),
    ("use_ema: 1", r"r\.yaml: use_ema: expected true or false"),
    ("validation_prompts: 3", None),  # a number is a valid string, as on the command line
])
def test_recipe_values_are_checked_like_command_line_values(tmp_path, line, match):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(line + "\n")
    argv = ["--config", str(recipe), "--output_dir", str(tmp_path / "o"), "--ann_root", "x"]
    if match is None:
        assert parse_args_with_recipe(_train_parser(), argv).validation_prompts == ["3"]
        return
    with pytest.raises(InputError, match=match) as e:
        parse_args_with_recipe(_train_parser(), argv)
    assert "\n" not in str(e.value)


def test_recipe_values_are_converted_like_command_line_values(tmp_path):
    recipe = tmp_path / "r.yaml"
    # YAML 1.1 reads 1e-3 (no dot) as a string; argparse's float() converts it like a typed flag
    recipe.write_text("learning_rate: 1e-3\ntrain_batch_size: 4\nlambda_mse: 1\ncenter_crop: false\n"
                      "validation_prompts: [a red circle, a blue square]\nmixed_precision: 'no'\n")
    args = parse_args_with_recipe(_train_parser(), ["--config", str(recipe)])
    assert args.learning_rate == 1e-3 and isinstance(args.learning_rate, float)
    assert args.train_batch_size == 4 and isinstance(args.lambda_mse, float)
    assert args.center_crop is False and args.validation_prompts == ["a red circle", "a blue square"]
    assert args.mixed_precision == "no"


def test_recipe_unknown_key_suggests_the_closest_name(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learnig_rate: 0.5\n")
    with pytest.raises(InputError, match=r"r\.yaml: unknown option 'learnig_rate' \(did you mean learning_rate\?\)"):
        parse_args_with_recipe(_train_parser(), ["--config", str(recipe)])


def test_shipped_recipes_pass_the_validation():
    from pathlib import Path

    from demo.pretrain_vae import build_parser as vae_parser
    from utils.common.config import load_recipe, validate_recipe

    root = Path(__file__).resolve().parent.parent / "configs"
    for name in ("train_flickr30k", "train_coco", "train_cc3m", "demo_edge", "demo_pretrain", "demo_model_build"):
        validate_recipe(_train_parser(), load_recipe(root / f"{name}.yaml"), name)
    validate_recipe(vae_parser(), load_recipe(root / "demo_vae.yaml"), "demo_vae")
