"""Atomic I/O, seeding and recipe handling."""
import argparse
import json

import pytest
import torch

from utils.atomic_io import append_jsonl, atomic_write_json, read_jsonl
from utils.config import parse_args_with_recipe, save_run_config
from utils.errors import InputError
from utils.seeding import derive_seed, item_generator


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
