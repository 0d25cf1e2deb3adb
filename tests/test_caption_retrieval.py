"""Retrieval backend: nearest real captions under a scorer, own prompt and its duplicates excluded."""
import json

import pytest
import torch
from PIL import Image

import caption_synthesis_retrieval as retrieval_script
import utils.models.scorers as scorers
from dataset.distilled import read_distilled_set, write_distilled_set
from utils.common.errors import InputError
from utils.models.tiny import build_tiny_hf_clip
from utils.stages.captioning.retrieval import rank_pool

POOL = ["a red circle", "A red circle.", "one red square", "a red red and blue square", "a red and green circle",
        "a green circle", "a blue circle", "a green green and blue square"]
COLOURS = {"red": 0, "green": 1, "blue": 2}


class ColourScorer(scorers.Scorer):
    """Image feature = mean RGB; text feature = counts of colour words (hand-checkable cosines)."""

    image_size = (8, 8)
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def modules(self):
        return []

    def _image_features(self, pixels):
        return pixels.mean(dim=(2, 3))

    def _text_features(self, captions):
        feats = torch.zeros(len(captions), 3)
        for i, c in enumerate(captions):
            for word in c.lower().replace(".", " ").split():
                if word in COLOURS:
                    feats[i, COLOURS[word]] += 1
        return feats


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)


def make_pool(folder):
    folder.mkdir(parents=True, exist_ok=True)
    entries = [{"image": f"img{i}.jpg", "caption": c, "image_id": str(i)} for i, c in enumerate(POOL)]
    (folder / "train.json").write_text(json.dumps(entries))
    return folder / "train.json"


def make_set(folder):
    (folder / "images").mkdir(parents=True)
    items = [((255, 0, 0), "a red circle"), ((0, 255, 0), "a green circle")]
    for i, (rgb, _) in enumerate(items):
        Image.new("RGB", (20, 20), rgb).save(folder / f"images/{i:06d}.png")
    write_distilled_set(folder, [{"image": f"images/{i:06d}.png", "captions": [p]} for i, (_, p) in enumerate(items)],
                        {"sampling": {"seed": 3}})
    return folder


def test_rank_pool_skips_prompt_and_duplicates():
    sims = torch.tensor([0.9, 0.8, 0.7, 0.1])
    pool = ["A dog.", "a dog", "a cat", "a cow"]
    assert rank_pool(sims, pool, "a DOG", 2) == ["a cat", "a cow"]
    assert rank_pool(sims, pool, "a bird", 5) == ["A dog.", "a cat", "a cow"]


def test_retrieval_picks_the_highest_ranked_real_captions(tmp_path, monkeypatch):
    monkeypatch.setattr(scorers, "build_scorer", lambda spec, device="cpu", dtype=torch.float32: ColourScorer(device))
    ann = make_pool(tmp_path / "pool")
    src = make_set(tmp_path / "set")
    out = tmp_path / "out"
    summary = retrieval_script.main(retrieval_script.parse_args(
        ["--input_dir", str(src), "--output_dir", str(out), "--cpi", "3", "--dataset", "karpathy",
         "--ann_root", str(ann), "--scorer", "colour:test", "--batch_size", "1"]))
    ds = read_distilled_set(out)
    assert ds.records[0]["captions"] == ["a red circle", "one red square", "a red red and blue square"]
    assert ds.records[1]["captions"] == ["a green circle", "a green green and blue square", "a red and green circle"]
    assert ds.manifest["captions"]["backend"] == "retrieval" and ds.manifest["captions"]["settings"]["pool_size"] == 8
    assert ds.manifest["sampling"] == {"seed": 3}
    assert summary["short"]["count"] == 0
    assert len(list((out / "caption_cache").glob("pool_text_*.pt"))) == 1


def test_retrieval_with_tiny_clip_caches_pool_features_and_extends_cpi(tmp_path, monkeypatch):
    clip = build_tiny_hf_clip(tmp_path / "clip")
    ann = make_pool(tmp_path / "pool")
    src = make_set(tmp_path / "set")
    base = ["--input_dir", str(src), "--inplace", "--dataset", "karpathy", "--ann_root", str(ann),
            "--scorer", f"hf_clip:{clip}"]
    retrieval_script.main(retrieval_script.parse_args(base + ["--cpi", "2"]))
    first = read_distilled_set(src).records
    assert all(len(r["captions"]) == 2 and r["captions"][1] in POOL for r in first)
    # a larger --cpi keeps the captions already chosen and reuses the saved pool features
    monkeypatch.setattr(scorers.Scorer, "encode_text", lambda self, c: pytest.fail("pool re-encoded"))
    summary = retrieval_script.main(retrieval_script.parse_args(base + ["--cpi", "4"]))
    second = read_distilled_set(src).records
    for a, b in zip(first, second):
        assert b["captions"][:2] == a["captions"] and len(b["captions"]) == 4
        assert len({c.lower().strip(".") for c in b["captions"]}) == 4
    assert summary["resumed_from_cache"] == 0 and summary["short"]["count"] == 0


def test_retrieval_bad_inputs(tmp_path):
    src = make_set(tmp_path / "set")
    with pytest.raises(InputError, match="--dataset"):
        retrieval_script.main(retrieval_script.parse_args(["--input_dir", str(src), "--inplace"]))
    with pytest.raises(InputError, match="annotations not found"):
        retrieval_script.main(retrieval_script.parse_args(
            ["--input_dir", str(src), "--inplace", "--dataset", "flickr30k", "--ann_root", str(tmp_path / "none")]))
    with pytest.raises(InputError, match="--cpi"):
        retrieval_script.main(retrieval_script.parse_args(["--input_dir", str(src), "--inplace", "--cpi", "-1"]))


def test_caption_synthesis_refuses_a_set_whose_annotations_omit_an_image(tmp_path, monkeypatch):
    monkeypatch.setattr(scorers, "build_scorer", lambda spec, device="cpu", dtype=torch.float32: ColourScorer(device))
    ann = make_pool(tmp_path / "pool")
    src = make_set(tmp_path / "set")
    train = src / "annotations" / "train.json"
    train.write_text(json.dumps([e for e in json.loads(train.read_text()) if e["image"] != "images/000001.png"]))
    with pytest.raises(InputError, match=r"train.json omits image images/000001.png"):
        retrieval_script.main(retrieval_script.parse_args(
            ["--input_dir", str(src), "--output_dir", str(tmp_path / "out"), "--cpi", "2", "--dataset", "karpathy",
             "--ann_root", str(ann), "--scorer", "colour:test"]))
    assert not (tmp_path / "out" / "annotations").exists()
