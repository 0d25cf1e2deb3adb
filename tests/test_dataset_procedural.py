"""The procedural data set: determinism, resume, caption/attribute agreement, formats."""
import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from dataset.karpathy import group_by_image, read_karpathy_eval, read_karpathy_train
from dataset.procedural import (ProceduralSpec, caption_attributes, generate_procedural_dataset, image_attributes,
                                main, parse_args, read_attributes, read_spec)
from dataset.registry import load_split
from utils.common.errors import InputError

SMALL = dict(resolution=32, n_train=40, n_val=8, n_test=12)


def _digest(folder):
    """sha256 of every file (relative path + bytes) under folder."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("proc") / "set"
    generate_procedural_dataset(out, ProceduralSpec(**SMALL), seed=0, progress=False)
    return out


def test_layout_and_formats(small_set):
    train = read_karpathy_train(small_set / "annotations" / "procedural_train.json", small_set)
    groups = group_by_image(train)
    assert len(groups) == 40 and all(len(g["captions"]) == 5 for g in groups)
    assert all(len(set(g["captions"])) == 5 for g in groups), "captions of one image must differ"
    assert groups[3]["image"] == "images/train/000003.png"
    for split, n in (("val", 8), ("test", 12)):
        entries = read_karpathy_eval(small_set / "annotations" / f"procedural_{split}.json", small_set)
        assert len(entries) == n and all(len(e["caption"]) == 5 for e in entries)
    image = Image.open(small_set / "images" / "test" / "000011.png")
    assert image.size == (32, 32) and image.mode == "RGB"
    spec, seed = read_spec(small_set)
    assert spec == ProceduralSpec(**SMALL) and seed == 0
    assert len(load_split("procedural", "test", small_set)) == 12


def test_same_seed_same_bytes_different_seed_differs(small_set, tmp_path):
    again = generate_procedural_dataset(tmp_path / "again", ProceduralSpec(**SMALL), seed=0, progress=False)
    assert _digest(again) == _digest(small_set)
    other = generate_procedural_dataset(tmp_path / "other", ProceduralSpec(**SMALL), seed=1, progress=False)
    assert (other / "images/train/000000.png").read_bytes() != (small_set / "images/train/000000.png").read_bytes()
    assert (other / "annotations/procedural_train.json").read_bytes() != \
        (small_set / "annotations/procedural_train.json").read_bytes()


def test_resume_does_not_rewrite_and_other_spec_is_refused(tmp_path):
    out = generate_procedural_dataset(tmp_path / "s", ProceduralSpec(**SMALL), seed=3, progress=False)
    png = out / "images/val/000002.png"
    stamp = png.stat().st_mtime_ns
    spec_stamp = (out / "spec.json").stat().st_mtime_ns
    generate_procedural_dataset(out, ProceduralSpec(**SMALL), seed=3, progress=False)
    assert png.stat().st_mtime_ns == stamp and (out / "spec.json").stat().st_mtime_ns == spec_stamp
    with pytest.raises(InputError, match="different spec or seed"):
        generate_procedural_dataset(out, ProceduralSpec(**SMALL), seed=4, progress=False)
    bigger = ProceduralSpec(**{**SMALL, "n_test": 13})
    with pytest.raises(InputError, match="different spec or seed"):
        generate_procedural_dataset(out, bigger, seed=3, progress=False)
    generate_procedural_dataset(out, bigger, seed=3, overwrite=True, progress=False)
    assert (out / "images/test/000012.png").is_file()
    assert not list(out.glob(".procedural-*")), "temporary folder left behind"


def test_set_from_older_generator_is_remade(tmp_path):
    out = generate_procedural_dataset(tmp_path / "s", ProceduralSpec(**SMALL), seed=0, progress=False)
    record = json.loads((out / "spec.json").read_text())
    good = (out / "annotations/procedural_test.json").read_bytes()
    (out / "annotations/procedural_test.json").write_text("[]")
    (out / "spec.json").write_text(json.dumps({**record, "format_version": record["format_version"] - 1}))
    generate_procedural_dataset(out, ProceduralSpec(**SMALL), seed=0, progress=False)
    assert (out / "annotations/procedural_test.json").read_bytes() == good
    assert json.loads((out / "spec.json").read_text()) == record


def test_foreign_folder_is_refused(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(InputError, match="no spec.json"):
        generate_procedural_dataset(tmp_path, ProceduralSpec(**SMALL), progress=False)


def _assert_reads_back(caption, drawn, spec=None):
    """The caption names every drawn object's colour, shape, size and position, and the true background if any."""
    objects, parsed = drawn["objects"], caption_attributes(caption, spec)
    assert sorted(parsed["colours"]) == sorted({o["colour"] for o in objects}), caption
    assert sorted(parsed["shapes"]) == sorted({o["shape"] for o in objects}), caption
    assert sorted(parsed["sizes"]) == sorted({o["size"] for o in objects}), caption
    assert sorted(parsed["positions"]) == sorted({o["position"] for o in objects}), caption
    assert parsed["backgrounds"] in ([], [drawn["background"]]), caption


def test_captions_name_exactly_the_drawn_colours_and_shapes(small_set):
    attributes = read_attributes(small_set)
    train = read_karpathy_train(small_set / "annotations" / "procedural_train.json")
    tests = read_karpathy_eval(small_set / "annotations" / "procedural_test.json")
    pairs = [(e["image"], e["caption"]) for e in train] + [(e["image"], c) for e in tests for c in e["caption"]]
    n_multi = 0
    for rel, caption in pairs:
        objects = attributes[rel]["objects"]
        n_multi += len(objects) > 1
        _assert_reads_back(caption, attributes[rel])
        for o in objects:
            size_words = {"small": ("small", "little"), "large": ("large", "big")}[o["size"]]
            assert any(re.search(rf"\b{w}\b", caption) for w in size_words), caption
    assert n_multi > 0, "the default spec must produce multi-shape images"
    assert image_attributes(small_set, "images/test/000000.png") == attributes["images/test/000000.png"]
    with pytest.raises(InputError, match="no entry for images/test/999999.png"):
        image_attributes(small_set, "images/test/999999.png")


def test_pixels_match_attributes(small_set):
    """The named colours are actually drawn: each object's palette colour appears in the image."""
    from dataset.procedural import COLOUR_PALETTE

    attributes = read_attributes(small_set)
    for rel in list(attributes)[:20]:
        pixels = set(Image.open(small_set / rel).convert("RGB").getdata())
        for o in attributes[rel]["objects"]:
            assert COLOUR_PALETTE[o["colour"]] in pixels, (rel, o)


def test_caption_attributes_parsing():
    parsed = caption_attributes("Two stars: a RED star and one big circle coloured blue on a light grey background")
    assert parsed == {"colours": ["red", "blue"], "shapes": ["star", "circle"], "sizes": ["large"],
                      "positions": [], "backgrounds": ["light grey"]}
    none = {"colours": [], "shapes": [], "sizes": [], "positions": [], "backgrounds": []}
    assert caption_attributes("nothing here") == none
    spec = ProceduralSpec(shapes=("circle", "square"), colours=("red", "green"))
    assert caption_attributes("a blue square", spec) == {**none, "shapes": ["square"]}
    # synonyms of the templates, and the background names that share a word
    parsed = caption_attributes("in the upper part, a little red star; grey gradient background")
    assert (parsed["sizes"], parsed["positions"], parsed["backgrounds"]) == (["small"], ["top"], ["grey gradient"])
    assert caption_attributes("in the middle of a light grey background")["positions"] == ["center"]


def test_shape_scale_draws_bigger_shapes(tmp_path):
    """shape_scale multiplies the radii: more pixels differ from the background, same captions."""
    def coloured_pixels(scale):
        spec = ProceduralSpec(resolution=32, max_shapes=1, n_train=20, n_val=1, n_test=1, shape_scale=scale,
                              backgrounds=("white",))
        d = generate_procedural_dataset(tmp_path / str(scale), spec, seed=3)
        return sum(np.abs(np.asarray(Image.open(p).convert("RGB"), dtype=int)
                          - np.asarray(Image.open(p).convert("RGB"))[0, 0]).sum(-1).astype(bool).sum()
                   for p in sorted((d / "images" / "train").glob("*.png"))), \
            (d / "annotations" / "procedural_train.json").read_text()
    small, captions_small = coloured_pixels(1.0)
    big, captions_big = coloured_pixels(1.25)
    assert big > 1.3 * small
    assert captions_small == captions_big
    with pytest.raises(InputError, match="shape_scale"):
        ProceduralSpec(shape_scale=3.0)


def test_spec_validation():
    with pytest.raises(InputError, match="unknown colours magenta"):
        ProceduralSpec(colours=("red", "magenta"))
    with pytest.raises(InputError, match="max_shapes"):
        ProceduralSpec(max_shapes=6)
    with pytest.raises(InputError, match="resolution"):
        ProceduralSpec(resolution=8)


def test_cli_and_default_spec(tmp_path):
    args = parse_args(["--output_dir", str(tmp_path / "cli"), "--resolution", "32", "--n_train", "6", "--n_val",
                       "2", "--n_test", "2", "--shapes", "circle,star", "--max_shapes", "2", "--seed", "5"])
    out = main(args)
    spec, seed = read_spec(out)
    assert seed == 5 and spec.shapes == ("circle", "star") and spec.max_shapes == 2
    record = json.loads((out / "spec.json").read_text())
    assert record["spec"]["n_train"] == 6
    default = ProceduralSpec()
    assert default.resolution == 64 and default.n_train >= 1000 and 1 <= default.min_shapes < default.max_shapes
    assert len(default.shapes) >= 4 and len(default.colours) >= 5


def test_alternate_caption_style_names_the_drawn_scene_in_other_words(tmp_path):
    """The held-out caption style: every caption reads back to the drawn attributes, and none of it uses
    the standard templates' size or position words."""
    spec = ProceduralSpec(**SMALL, caption_style="alternate", captions_per_image=6)
    out = generate_procedural_dataset(tmp_path / "alt", spec, seed=0, progress=False)
    assert read_spec(out)[0].caption_style == "alternate"
    attributes = read_attributes(out)
    train = read_karpathy_train(out / "annotations" / "procedural_train.json")
    standard_words = re.compile(r"\b(small|little|large|big|upper|lower|middle|center|left side|right side)\b")
    n_multi = 0
    for entry in train:
        caption = entry["caption"]
        n_multi += len(attributes[entry["image"]]["objects"]) > 1
        _assert_reads_back(caption, attributes[entry["image"]], spec)
        assert not standard_words.search(caption), caption
    assert n_multi > 0
    captions_of_first = [e["caption"] for e in train if e["image"] == train[0]["image"]]
    assert len(set(captions_of_first)) == 6


def test_caption_style_default_keeps_old_spec_records_and_bad_values_fail():
    assert "caption_style" not in ProceduralSpec(**SMALL).to_dict()  # old spec.json files still match
    assert ProceduralSpec.from_dict(ProceduralSpec(**SMALL).to_dict()).caption_style == "standard"
    assert ProceduralSpec(caption_style="alternate").to_dict()["caption_style"] == "alternate"
    with pytest.raises(InputError, match="unknown caption_style plain; known: standard, alternate"):
        ProceduralSpec(caption_style="plain")
    with pytest.raises(InputError, match=r"captions_per_image must be in 1..6 \(the alternate"):
        ProceduralSpec(caption_style="alternate", captions_per_image=7)
    args = parse_args(["--output_dir", "x", "--caption_style", "alternate"])
    assert args.caption_style == "alternate"


def test_caption_noise_swaps_one_colour_or_shape_in_the_recorded_training_captions(small_set, tmp_path):
    """--caption_noise: the drawn images, the held-out captions and every clean training caption are the
    noise-free set's; each recorded noisy caption differs from its clean one in one colour or one shape."""
    spec = ProceduralSpec(**dict(SMALL, n_train=200), caption_noise=0.3)
    out = generate_procedural_dataset(tmp_path / "noisy", spec, seed=0, progress=False)
    clean = generate_procedural_dataset(tmp_path / "clean", ProceduralSpec(**dict(SMALL, n_train=200)), seed=0,
                                        progress=False)
    assert read_spec(out)[0].caption_noise == 0.3
    for split in ("val", "test"):
        name = f"annotations/procedural_{split}.json"
        assert (out / name).read_bytes() == (clean / name).read_bytes()
    assert (out / "images/train/000007.png").read_bytes() == (clean / "images/train/000007.png").read_bytes()
    noisy_record = json.loads((out / "annotations/procedural_noisy_captions.json").read_text())
    attributes = read_attributes(out)
    noisy_train = read_karpathy_train(out / "annotations" / "procedural_train.json")
    clean_train = read_karpathy_train(clean / "annotations" / "procedural_train.json")
    n_noisy, position = 0, {}
    for noisy_entry, clean_entry in zip(noisy_train, clean_train):
        rel = noisy_entry["image"]
        j = position[rel] = position.get(rel, -1) + 1
        if str(j) not in noisy_record.get(rel, {}):
            assert noisy_entry["caption"] == clean_entry["caption"]
            continue
        n_noisy += 1
        assert noisy_record[rel][str(j)] == noisy_entry["caption"]
        want = caption_attributes(clean_entry["caption"], spec)
        assert sorted(want["colours"]) == sorted({o["colour"] for o in attributes[rel]["objects"]})
        # exactly one word differs, and it is a colour for a colour or a shape for a shape
        got_words, want_words = (re.findall(r"\w+", e["caption"]) for e in (noisy_entry, clean_entry))
        assert len(got_words) == len(want_words)
        changed = [(a, b) for a, b in zip(got_words, want_words) if a != b]
        assert len(changed) == 1, (noisy_entry["caption"], clean_entry["caption"])
        kinds = [{k for k in ("colours", "shapes") if caption_attributes(w, spec)[k]} for w in changed[0]]
        assert kinds[0] == kinds[1] and len(kinds[0]) == 1, changed
    share = n_noisy / len(noisy_train)
    assert 0.25 < share < 0.35, share  # 1000 captions at p = 0.3: outside this is a >3-sigma event
    # demo.noisy_captions flags exactly the drawn pairs whose caption is not the clean set's (same draw)
    from dataset.procedural import read_noisy_captions
    from demo.noisy_captions import noisy_pair_flags, pair_groups

    drawn, drawn_clean = pair_groups(out, random_n=100, seed=3), pair_groups(clean, random_n=100, seed=3)
    assert [g["image"] for g in drawn] == [g["image"] for g in drawn_clean]
    want = [a["captions"] != b["captions"] for a, b in zip(drawn, drawn_clean)]
    assert noisy_pair_flags(drawn, read_noisy_captions(out)) == want and 0 < sum(want) < 100
    with pytest.raises(InputError, match="procedural_noisy_captions.json not found"):
        read_noisy_captions(clean)


def test_corrupt_caption_swaps_one_mention_only():
    """Two objects share a colour: one mention changes, the other stays."""
    import random

    from dataset.procedural import corrupt_caption

    spec = ProceduralSpec(colours=("red", "blue"), shapes=("circle",), max_shapes=2)
    scene = {"background": "white", "objects": [{"colour": "red", "shape": "circle"},
                                                {"colour": "red", "shape": "circle"}]}
    caption = "a red circle and a red circle on white"
    seen = set()
    for seed in range(20):
        out = corrupt_caption(caption, scene, spec, random.Random(seed))
        assert out.count("blue") == 1 and out.count("red") == 1 and out.endswith("on white"), out
        seen.add(out)
    assert seen == {"a blue circle and a red circle on white", "a red circle and a blue circle on white"}
    with pytest.raises(ValueError, match="does not name its object's"):
        corrupt_caption("a circle on white", scene, spec, random.Random(0))


def test_noisy_pair_flags_by_hand():
    from demo.noisy_captions import noisy_pair_flags

    noisy = {"a.png": {"1": "a red star"}, "b.png": {"0": "a blue disc"}}
    groups = [{"image": "a.png", "captions": ["a green star", "a red star"]},
              {"image": "b.png", "captions": ["a red star"]}, {"image": "c.png", "captions": ["a blue disc"]}]
    assert noisy_pair_flags(groups, noisy) == [False, True, False, False]


def test_caption_noise_default_keeps_old_spec_records_and_bad_values_fail(small_set):
    assert "caption_noise" not in ProceduralSpec(**SMALL).to_dict()
    assert not (small_set / "annotations/procedural_noisy_captions.json").exists()
    with pytest.raises(InputError, match=r"caption_noise must be in \[0, 1\], got 1.5"):
        ProceduralSpec(caption_noise=1.5)
    with pytest.raises(InputError, match="caption_noise needs at least two colours or two shapes"):
        ProceduralSpec(colours=("red",), shapes=("circle",), max_shapes=1, caption_noise=0.1)
    assert parse_args(["--output_dir", "x", "--caption_noise", "0.2"]).caption_noise == 0.2
