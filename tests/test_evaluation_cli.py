"""The evaluation CLI end to end on a tiny procedural set with tiny saved encoders (1-2 epochs)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dataset.distilled import write_distilled_set
from evaluation.evaluation import main, parse_args
from utils.common.errors import InputError
from utils.models.retrieval_model import load_retrieval_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(tiny_eval_env):
    return tiny_eval_env("evalcli", n_train=16, n_val=6, n_test=8)


def _argv(env, out, *extra):
    return [*env["argv"], "--epochs", "2", "--output_dir", str(out), "--feature_cache_dir", str(env["base"] / "cache"),
            *extra]


def test_random_baseline_two_seeds_outputs(env):
    out = env["base"] / "run_random"
    table = env["base"] / "results.md"
    res = main(parse_args(_argv(env, out, "--baseline", "random", "--n", "6", "--seeds", "2", "--selection",
                                "best_val", "--results_table", str(table), "--save_model_dir",
                                str(env["base"] / "model"))))
    saved = json.loads((out / "results.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["train_set"]["n_images"] == 6 and saved["train_set"]["n_captions"] == 6
    assert saved["image_size"] == 32 and saved["test_split"] == {"n_images": 8, "n_captions": 40}
    assert saved["selection"]["rule"] == "best_val"
    for seed in ("0", "1"):
        hist = saved["history"][seed]
        assert [h["epoch"] for h in hist] == [1, 2] and all("val" in h and "test" in h for h in hist)
    for key, stats in saved["summary"].items():
        vals = [r["test"][key] for r in saved["per_seed"]]
        assert stats["mean"] == pytest.approx(sum(vals) / 2)
        assert 0.0 <= stats["mean"] <= 100.0
    assert res["summary"] == saved["summary"]
    assert (out / "r_mean.png").stat().st_size > 1000 and (out / "run_config.json").is_file()
    rows = table.read_text().splitlines()
    assert len(rows) == 3 and "best epoch on val" in rows[2] and "0,1" in rows[2]
    model, text_encoder, pre = load_retrieval_model(env["base"] / "model" / "seed_1", "cpu")
    assert pre["size"] == 32
    with torch.no_grad():
        f = model.image_features(torch.randn(2, 3, 32, 32))
    assert f.shape == (2, 64)
    # the random subset is drawn from --seed: same images on a rerun
    again = main(parse_args(_argv(env, env["base"] / "run_random2", "--baseline", "random", "--n", "6",
                                  "--epochs", "1")))
    assert again["train_set"]["images"] == saved["train_set"]["images"]


def test_best_test_label_and_refuses_overwrite(env):
    out = env["base"] / "run_full"
    res = main(parse_args(_argv(env, out, "--baseline", "full", "--selection", "best_test", "--epochs", "1")))
    assert "optimistic, LoRS rule" in res["selection"]["label"]
    assert res["train_set"]["n_images"] == 16 and res["train_set"]["n_captions"] == 80
    with pytest.raises(InputError, match="exists"):
        main(parse_args(_argv(env, out, "--baseline", "full", "--epochs", "1")))


def _make_distilled(folder, n=4, with_missing=False):
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        Image.new("RGB", (40, 40), (60 * i % 255, 100, 200)).save(folder / "images" / f"{i:06d}.png")
        records.append({"image": f"images/{i:06d}.png", "captions": [f"a red circle {i}", f"a shape {i}"]})
    write_distilled_set(folder, records, {"model": "test"})
    if with_missing:
        (folder / "images" / "000001.png").unlink()
    return folder


def test_distilled_set_and_lors_pt(env):
    folder = _make_distilled(env["base"] / "distilled")
    res = main(parse_args(_argv(env, env["base"] / "run_dist", "--distill_dir", str(folder), "--epochs", "1")))
    assert res["train_set"]["n_images"] == 4 and res["train_set"]["n_captions"] == 8
    pt = env["base"] / "lors.pt"
    torch.save({"image": torch.randn(5, 3, 16, 16), "text": torch.randn(5, 32),
                "syn_lr_img": torch.tensor(0.05), "syn_lr_txt": torch.tensor(0.02)}, pt)
    res = main(parse_args(_argv(env, env["base"] / "run_lors", "--lors_pt", str(pt), "--epochs", "1",
                                "--lors_learned_lr")))
    assert res["image_size"] == 16 and res["train_set"]["n_images"] == 5
    bad = env["base"] / "lors_bad.pt"
    torch.save({"image": torch.randn(5, 3, 16, 16), "text": torch.randn(5, 768)}, bad)
    with pytest.raises(InputError, match="dim 768"):
        main(parse_args(_argv(env, env["base"] / "run_lors_bad", "--lors_pt", str(bad))))


def test_bad_inputs_fail_before_training(env, tmp_path):
    missing = _make_distilled(tmp_path / "missing_image", with_missing=True)
    with pytest.raises(InputError, match="000001.png"):
        main(parse_args(_argv(env, tmp_path / "o1", "--distill_dir", str(missing))))
    empty = tmp_path / "empty"
    (empty / "annotations").mkdir(parents=True)
    (empty / "annotations" / "train.json").write_text("[]")
    with pytest.raises(InputError, match="empty"):
        main(parse_args(_argv(env, tmp_path / "o2", "--distill_dir", str(empty))))
    with pytest.raises(InputError, match="test"):
        main(parse_args(["--dataset", "flickr30k", "--ann_root", str(tmp_path), "--baseline", "full",
                         "--output_dir", str(tmp_path / "o3")]))
    with pytest.raises(InputError, match="exceeds"):
        main(parse_args(_argv(env, tmp_path / "o4", "--baseline", "random", "--n", "999")))
    with pytest.raises(InputError, match="exactly one"):
        parse_args(_argv(env, tmp_path / "o5", "--baseline", "full", "--distill_dir", str(missing)))
    with pytest.raises(InputError, match="--n"):
        parse_args(_argv(env, tmp_path / "o6", "--baseline", "random"))
    assert not (tmp_path / "o1" / "results.json").exists()


def test_runs_as_a_module_and_says_so_when_run_as_a_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "evaluation.evaluation", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--selection" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "evaluation.evaluation", "--dataset", "procedural", "--baseline",
                           "random"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    # the file form (this folder first on sys.path shadows the package): one line naming the module form
    proc = subprocess.run([sys.executable, str(ROOT / "evaluation" / "evaluation.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: run stage 4 as a module from the repository root: python -m evaluation.evaluation ..."]


def test_warns_when_the_manifest_records_failed_or_missing_captions(env, tmp_path, capsys):
    from evaluation.data import train_groups

    folder = _make_distilled(tmp_path / "short_set")
    records = [{"image": f"images/{i:06d}.png", "captions": [f"a red circle {i}"] + ([f"x {i}"] if i != 2 else [])}
               for i in range(4)]
    write_distilled_set(folder, records, {"captions": {"cpi": 2, "failed": {"count": 1, "images": [
        {"image": "images/000002.png", "error": "timeout"}]}, "short": {"count": 0, "images": []}}})
    groups, _ = train_groups(parse_args(_argv(env, tmp_path / "o", "--distill_dir", str(folder))))
    assert len(groups) == 4
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(err) == 1 and str(folder / "manifest.json") in err[0] and "images/000002.png" in err[0]


def test_random_baseline_captions_per_image(env, tmp_path):
    from evaluation.data import train_groups

    one = train_groups(parse_args(_argv(env, tmp_path / "a", "--baseline", "random", "--n", "6")))[0]
    five = train_groups(parse_args(_argv(env, tmp_path / "b", "--baseline", "random", "--n", "6",
                                         "--captions_per_image", "5")))[0]
    assert [len(g["captions"]) for g in one] == [1] * 6
    assert [g["image"] for g in five] == [g["image"] for g in one]  # the same images as the 1-caption baseline
    assert all(len(g["captions"]) == 5 == len(set(g["captions"])) for g in five)
    with pytest.raises(InputError, match="captions_per_image only applies"):
        parse_args(_argv(env, tmp_path / "c", "--baseline", "full", "--captions_per_image", "5"))


def test_x0_augment_is_recorded_and_changes_training(env, tmp_path):
    plain = main(parse_args(_argv(env, tmp_path / "plain", "--baseline", "random", "--n", "6", "--epochs", "1")))
    aug = main(parse_args(_argv(env, tmp_path / "aug", "--baseline", "random", "--n", "6", "--epochs", "1",
                                "--x0_augment")))
    saved = json.loads((tmp_path / "aug" / "results.json").read_text())
    assert saved["protocol"]["x0_augment"] is True
    assert aug["history"]["0"][0]["loss"] != plain["history"]["0"][0]["loss"]


def test_real_twin_trains_on_the_prompts_source_images_with_the_sets_captions(env, tmp_path):
    from dataset.karpathy import group_by_image
    from dataset.registry import read_split
    from evaluation.data import train_groups

    entries, _, image_root = read_split("procedural", "train", str(env["data"]), None)
    real = group_by_image(entries)
    folder = _make_distilled(tmp_path / "set", n=3)
    sources = [real[5]["image"], real[0]["image"], real[9]["image"]]
    write_distilled_set(folder, [{"image": f"images/{i:06d}.png", "captions": [f"prompt {i}", f"extra {i}"]}
                                 for i in range(3)], {"prompt_source": {"type": "dataset", "source_images": sources}})
    twin, root = train_groups(parse_args(_argv(env, tmp_path / "o", "--distill_dir", str(folder), "--real_twin")))
    assert Path(root) == Path(image_root)
    assert [g["image"] for g in twin] == sources  # by the record's index, not the split's order
    assert [g["captions"] for g in twin] == [[f"prompt {i}", f"extra {i}"] for i in range(3)]
    res = main(parse_args(_argv(env, tmp_path / "run", "--distill_dir", str(folder), "--real_twin",
                                "--epochs", "1")))
    assert res["train_set"]["images"] == sources and "real-twin:set" in res["run_name"]
    # a source image not in the split, and a set sampled from a prompts file: one-line errors naming the manifest
    write_distilled_set(folder, [{"image": f"images/{i:06d}.png", "captions": [f"p {i}"]} for i in range(3)],
                        {"prompt_source": {"type": "dataset", "source_images": sources[:2] + ["images/nope.png"]}})
    with pytest.raises(InputError, match=r"manifest\.json: source image images/nope\.png of images/000002\.png"):
        train_groups(parse_args(_argv(env, tmp_path / "o2", "--distill_dir", str(folder), "--real_twin")))
    write_distilled_set(folder, [{"image": f"images/{i:06d}.png", "captions": [f"p {i}"]} for i in range(3)],
                        {"prompt_source": {"type": "prompts_file", "path": "p.txt"}})
    with pytest.raises(InputError, match="no prompt_source.source_images"):
        train_groups(parse_args(_argv(env, tmp_path / "o3", "--distill_dir", str(folder), "--real_twin")))
    with pytest.raises(InputError, match="--real_twin needs --distill_dir"):
        parse_args(_argv(env, tmp_path / "o4", "--baseline", "random", "--n", "4", "--real_twin"))
