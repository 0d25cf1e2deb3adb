"""Distilled-set folders: write -> read round trip, imagefolder metadata, validation."""
import json
import sys

import pytest
from PIL import Image

from dataset.distilled import (is_distilled_set, read_distilled_set, read_manifest, write_distilled_set,
                               write_manifest)
from dataset.karpathy import read_karpathy_train
from utils.common.errors import InputError


def _images(folder, n):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / "images" / f"{i:06d}.png")
    return [f"images/{i:06d}.png" for i in range(n)]


def test_round_trip(tmp_path):
    rels = _images(tmp_path, 3)
    records = [{"image": rels[0], "captions": ["a red thing", "something red"]},
               {"image": rels[1], "captions": ["a dark square"]},
               {"image": rels[2], "captions": ["c1", "c2", "c3"]}]
    write_manifest(tmp_path, {"model": "old", "seed": 1})
    write_distilled_set(tmp_path, records, {"model": "tiny-sd", "steps": 25})
    assert is_distilled_set(tmp_path)
    ds = read_distilled_set(tmp_path)
    assert ds.records == records and len(ds) == 3
    assert ds.manifest == {"model": "tiny-sd", "seed": 1, "steps": 25, "num_images": 3, "num_captions": 6}
    assert read_manifest(tmp_path) == ds.manifest
    train = read_karpathy_train(tmp_path / "annotations" / "train.json", tmp_path)
    assert len(train) == 6 and train[0] == {"image": rels[0], "caption": "a red thing", "image_id": "000000"}
    assert ds.groups[2] == {"image": rels[2], "image_id": "000002", "captions": ["c1", "c2", "c3"]}
    lines = (tmp_path / "images" / "metadata.jsonl").read_text().splitlines()
    meta = [json.loads(line) for line in lines]
    assert meta[0] == {"file_name": "000000.png", "text": "a red thing", "captions": ["a red thing", "something red"]}
    assert all((tmp_path / "images" / m["file_name"]).is_file() for m in meta)
    assert not list(tmp_path.rglob("*.tmp")), "temporary files left behind"


def test_hf_datasets_not_required(tmp_path, monkeypatch):
    """Writing and reading work with the `datasets` package unavailable (we do not install it)."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # any `import datasets` now raises ImportError
    rels = _images(tmp_path, 2)
    write_distilled_set(tmp_path, [{"image": r, "captions": ["x"]} for r in rels], {})
    assert len(read_distilled_set(tmp_path)) == 2
    with pytest.raises(ImportError):
        import datasets  # noqa: F401


def test_rewrite_replaces_captions(tmp_path):
    rels = _images(tmp_path, 2)
    write_distilled_set(tmp_path, [{"image": r, "captions": ["p"]} for r in rels], {"stage": "sample"})
    write_distilled_set(tmp_path, [{"image": r, "captions": ["p", "q"]} for r in rels], {"stage": "caption"})
    ds = read_distilled_set(tmp_path)
    assert [r["captions"] for r in ds.records] == [["p", "q"], ["p", "q"]]
    assert ds.manifest["stage"] == "caption" and ds.manifest["num_captions"] == 4


def test_not_a_distilled_set(tmp_path):
    with pytest.raises(InputError, match="distilled set folder not found"):
        read_distilled_set(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"is not a distilled set folder: .*annotations/train.json is missing"):
        read_distilled_set(tmp_path)
    assert not is_distilled_set(tmp_path)


def test_caption_for_missing_image(tmp_path):
    rels = _images(tmp_path, 2)
    write_distilled_set(tmp_path, [{"image": r, "captions": ["x"]} for r in rels])
    (tmp_path / rels[1]).unlink()
    with pytest.raises(InputError, match=r"train.json entry 1: image file not found: .*000001.png"):
        read_distilled_set(tmp_path)
    assert len(read_distilled_set(tmp_path, check_images=False)) == 2


def test_empty_annotations(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.json").write_text("[]")
    with pytest.raises(InputError, match="train.json holds an empty split"):
        read_distilled_set(tmp_path)


@pytest.mark.parametrize("records, expected", [
    ([], "zero images"),
    ([{"captions": ["x"]}], 'record 0: missing "image"'),
    ([{"image": "images/000000.png", "captions": []}], "must be a non-empty list"),
    ([{"image": "images/000000.png", "captions": ["ok", " "]}], "empty or non-string caption"),
    ([{"image": "images/000009.png", "captions": ["x"]}], "image file not found"),
    ([{"image": "elsewhere/000000.png", "captions": ["x"]}], "must be images/<file name>"),
    ([{"image": "images/000000.png", "captions": ["x"]}] * 2, "appears twice"),
])
def test_write_validation(tmp_path, records, expected):
    _images(tmp_path, 1)
    with pytest.raises(InputError, match=expected):
        write_distilled_set(tmp_path, records, {})
    assert not (tmp_path / "annotations" / "train.json").exists()


def test_bad_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="manifest.json must hold a JSON object"):
        read_manifest(tmp_path)


def _drop_from_annotations(folder, image):
    ann = folder / "annotations" / "train.json"
    entries = [e for e in json.loads(ann.read_text()) if e["image"] != image]
    ann.write_text(json.dumps(entries))


def test_annotations_omitting_an_image_fail(tmp_path):
    """An image in images/ (and in the manifest) that the annotation file omits is not dropped silently."""
    rels = _images(tmp_path, 3)
    write_distilled_set(tmp_path, [{"image": r, "captions": ["x"]} for r in rels])
    _drop_from_annotations(tmp_path, rels[1])
    with pytest.raises(InputError, match=r"annotations/train.json omits image images/000001.png"):
        read_distilled_set(tmp_path)
    # the file gone too, but the manifest still counts it
    (tmp_path / rels[1]).unlink()
    with pytest.raises(InputError, match=r"manifest.json records 3 images but .*train.json captions 2"):
        read_distilled_set(tmp_path)


def test_caption_warnings_name_the_manifest(tmp_path):
    from dataset.distilled import caption_warnings

    rels = _images(tmp_path, 3)
    write_distilled_set(tmp_path, [{"image": rels[0], "captions": ["a", "b"]},
                                   {"image": rels[1], "captions": ["c"]},
                                   {"image": rels[2], "captions": ["d", "e"]}],
                        {"captions": {"cpi": 2, "failed": {"count": 1, "images": [{"image": rels[1], "error": "x"}]},
                                      "short": {"count": 0, "images": []}}})
    warnings = caption_warnings(read_distilled_set(tmp_path))
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "manifest.json" in warnings[0] and "1 image(s) have fewer than 2 captions" in warnings[0]
    assert "images/000001.png" in warnings[0] and "1 failed" in warnings[0]
    write_distilled_set(tmp_path, [{"image": r, "captions": ["a", "b"]} for r in rels],
                        {"captions": {"cpi": 2, "failed": {"count": 0}, "short": {"count": 0}}})
    assert caption_warnings(read_distilled_set(tmp_path)) == []
