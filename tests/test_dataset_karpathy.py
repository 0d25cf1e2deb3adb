"""Karpathy JSON readers, image loading and the data set registry."""
import json

import pytest
from PIL import Image

from dataset.images import load_image
from dataset.karpathy import group_by_image, read_karpathy_eval, read_karpathy_train
from dataset.registry import DATASETS, load_split, resolve_split
from utils.common.errors import InputError


def _png(path, colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def flickr(tmp_path):
    """A tiny Flickr30K-like layout: annotation/ and images/flickr30k-images/."""
    images = tmp_path / "images"
    for name in ("a", "b", "c"):
        _png(images / "flickr30k-images" / f"{name}.jpg")
    ann = tmp_path / "annotation"
    _write(ann / "flickr30k_train.json", [
        {"image": "flickr30k-images/a.jpg", "caption": "a dog runs", "image_id": "0"},
        {"image": "flickr30k-images/b.jpg", "caption": "a cat sits", "image_id": "1"},
        {"image": "flickr30k-images/a.jpg", "caption": "a brown dog", "image_id": "0"},
    ])
    _write(ann / "flickr30k_val.json", [{"image": "flickr30k-images/c.jpg", "caption": ["x", "y"]}])
    _write(ann / "flickr30k_test.json", [{"image": "flickr30k-images/b.jpg", "caption": "only one"},
                                         {"image": "flickr30k-images/c.jpg", "caption": ["p", "q", "r"]}])
    return ann, images


def test_train_reader_and_grouping(flickr):
    ann, images = flickr
    entries = read_karpathy_train(ann / "flickr30k_train.json", images)
    assert entries[1] == {"image": "flickr30k-images/b.jpg", "caption": "a cat sits", "image_id": "1"}
    groups = group_by_image(entries)
    assert [g["image"] for g in groups] == ["flickr30k-images/a.jpg", "flickr30k-images/b.jpg"]
    assert groups[0]["captions"] == ["a dog runs", "a brown dog"]
    assert groups[0]["image_id"] == "0"


def test_train_image_id_defaults_to_path(tmp_path):
    _png(tmp_path / "x.png")
    f = _write(tmp_path / "t.json", [{"image": "x.png", "caption": "c"}])
    assert read_karpathy_train(f, tmp_path)[0]["image_id"] == "x.png"


def test_eval_reader_wraps_single_caption(flickr):
    ann, images = flickr
    entries = read_karpathy_eval(ann / "flickr30k_test.json", images)
    assert entries == [{"image": "flickr30k-images/b.jpg", "caption": ["only one"]},
                       {"image": "flickr30k-images/c.jpg", "caption": ["p", "q", "r"]}]


@pytest.mark.parametrize("entries, expected", [
    ([{"image": "x.png", "caption": "ok"}, {"caption": "no image"}], 'entry 1: missing "image"'),
    ([{"image": "x.png"}], 'entry 0: missing "caption"'),
    ([{"image": "x.png", "caption": "  "}], 'entry 0: "caption" is empty'),
    ([{"image": "x.png", "caption": 3}], 'entry 0: "caption" must be a string'),
    ([{"image": "x.png", "caption": "ok"}, "oops"], "entry 1: expected an object"),
    ([], "empty split"),
    ({"image": "x.png"}, "must hold a JSON list"),
])
def test_train_reader_bad_entries(tmp_path, entries, expected):
    _png(tmp_path / "x.png")
    f = _write(tmp_path / "flickr30k_train.json", entries)
    with pytest.raises(InputError) as e:
        read_karpathy_train(f, tmp_path)
    assert "flickr30k_train.json" in str(e.value) and expected in str(e.value)


def test_eval_reader_bad_entries(tmp_path):
    _png(tmp_path / "x.png")
    f = _write(tmp_path / "coco_karpathy_test.json", [{"image": "x.png", "caption": []}])
    with pytest.raises(InputError, match=r"coco_karpathy_test.json entry 0: \"caption\" is an empty list"):
        read_karpathy_eval(f, tmp_path)
    f = _write(tmp_path / "coco_karpathy_test.json", [{"image": "x.png", "caption": ["fine", ""]}])
    with pytest.raises(InputError, match=r"coco_karpathy_test.json entry 0: \"caption\" is empty"):
        read_karpathy_eval(f, tmp_path)


def test_missing_image_named_with_entry(tmp_path):
    _png(tmp_path / "x.png")
    f = _write(tmp_path / "flickr30k_train.json", [{"image": "x.png", "caption": "a"}] * 17
               + [{"image": "gone.png", "caption": "b"}])
    with pytest.raises(InputError, match=r"flickr30k_train.json entry 17: image file not found: .*gone.png"):
        read_karpathy_train(f, tmp_path)
    assert len(read_karpathy_train(f, tmp_path, check_images=False)) == 18


def test_missing_and_invalid_json_files(tmp_path):
    with pytest.raises(InputError, match="annotation file not found: .*nope.json"):
        read_karpathy_train(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(InputError, match="bad.json is not valid JSON"):
        read_karpathy_eval(bad)


def test_load_image(tmp_path):
    _png(tmp_path / "ok.png", (1, 2, 3))
    img = load_image(tmp_path / "ok.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (1, 2, 3)
    Image.new("L", (4, 4), 7).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").mode == "RGB"
    with pytest.raises(InputError, match="image not found: .*missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="could not read image .*junk.jpg"):
        load_image(tmp_path / "junk.jpg")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "big.jpg", quality=95)
    data = (tmp_path / "big.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="could not read image .*truncated.jpg"):
        load_image(tmp_path / "truncated.jpg")


def test_registry_resolves_blip_names(flickr):
    ann, images = flickr
    assert resolve_split("flickr30k", "test", ann, images) == (ann / "flickr30k_test.json", images)
    assert len(load_split("flickr30k", "train", ann, images)) == 3
    assert load_split("flickr30k", "val", ann, images)[0]["caption"] == ["x", "y"]


def test_registry_unknown_dataset_and_split(flickr):
    ann, images = flickr
    with pytest.raises(InputError) as e:
        resolve_split("imagenet", "train", ann, images)
    assert "imagenet" in str(e.value) and all(name in str(e.value) for name in DATASETS)
    with pytest.raises(InputError, match="unknown split 'dev'"):
        resolve_split("flickr30k", "dev", ann, images)


def test_registry_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(InputError) as e:
        resolve_split("coco", "test", tmp_path, tmp_path)
    msg = str(e.value)
    assert "coco_karpathy_test.json" in msg and "BLIP/LoRS" in msg and "official COCO site" in msg
    with pytest.raises(InputError, match="flickr30k_val.json.*official Flickr30K site"):
        resolve_split("flickr30k", "val", tmp_path, tmp_path)
    with pytest.raises(InputError, match="python -m dataset.procedural"):
        resolve_split("procedural", "train", tmp_path)


def test_registry_karpathy_is_lenient(tmp_path):
    _png(tmp_path / "im" / "x.png")
    _write(tmp_path / "ann" / "mine_train.json", [{"image": "x.png", "caption": "c"}])
    _write(tmp_path / "ann" / "test.json", [{"image": "x.png", "caption": ["c"]}])
    assert resolve_split("karpathy", "train", tmp_path / "ann", tmp_path / "im")[0].name == "mine_train.json"
    assert resolve_split("karpathy", "test", tmp_path / "ann", tmp_path / "im")[0].name == "test.json"
    assert len(load_split("karpathy", "test", tmp_path / "ann" / "test.json", tmp_path / "im")) == 1
    with pytest.raises(InputError, match="karpathy val annotations not found"):
        resolve_split("karpathy", "val", tmp_path / "ann", tmp_path / "im")


def test_single_file_refused_for_a_split_it_does_not_name(tmp_path):
    """`--ann_root <train file>` must not be used as the test (or val) split."""
    _png(tmp_path / "im" / "x.png")
    train = _write(tmp_path / "ann" / "mine_train.json", [{"image": "x.png", "caption": "c"}])
    assert resolve_split("karpathy", "train", train, tmp_path / "im")[0] == train
    for split in ("test", "val"):
        with pytest.raises(InputError, match=f"mine_train.json.*train split.*{split}"):
            resolve_split("karpathy", split, train, tmp_path / "im")
    # a file that names no split is not taken as an evaluation split either
    plain = _write(tmp_path / "ann" / "captions.json", [{"image": "x.png", "caption": ["c"]}])
    with pytest.raises(InputError, match="captions.json.*names no split.*test"):
        resolve_split("karpathy", "test", plain, tmp_path / "im")
    assert resolve_split("karpathy", "train", plain, tmp_path / "im")[0] == plain
    # a test file is not training data
    test = _write(tmp_path / "ann" / "flickr30k_test.json", [{"image": "x.png", "caption": ["c"]}])
    with pytest.raises(InputError, match="flickr30k_test.json.*test split.*train"):
        resolve_split("flickr30k", "train", test, tmp_path / "im")
    assert resolve_split("flickr30k", "test", test, tmp_path / "im")[0] == test


def test_eval_split_refuses_repeated_images(tmp_path):
    _png(tmp_path / "x.png")
    _png(tmp_path / "y.png")
    f = _write(tmp_path / "ann" / "test.json", [{"image": "x.png", "caption": ["a"]},
                                                 {"image": "y.png", "caption": ["b"]},
                                                 {"image": "x.png", "caption": ["c"]}])
    with pytest.raises(InputError, match=r"test.json entry 2: image x.png repeats entry 0"):
        read_karpathy_eval(f, tmp_path)
    with pytest.raises(InputError, match="repeats"):
        load_split("karpathy", "test", tmp_path / "ann", tmp_path)
