"""The prompt-following measure of the demo report: per-attribute shares, their intervals, the classifier."""
import math

import pytest

from dataset.images import load_image
from dataset.procedural import ProceduralSpec, generate_procedural_dataset
from demo.prompt_following import (agreement, markdown_table, misread_lines, prompt_following, share,
                                   single_object_labels, train_attribute_classifier, wilson_interval)


def test_wilson_interval_by_hand():
    # k=8, n=10, z=1.96: centre (0.8 + 0.19208) / 1.38416 = 0.71674,
    # half 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.22658 (computed by hand)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(49.02, abs=0.02) and hi == pytest.approx(94.33, abs=0.02)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(16.11, abs=0.02)
    assert wilson_interval(20, 20)[1] == 100.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_agreement_by_hand():
    predicted = {"colour": ["red", "blue", "red", "green"], "shape": ["circle", "star", "square", "star"],
                 "background": ["white", "white", "beige", "white"]}
    named = {"colour": ["red", "red", "red", "green"], "shape": ["circle", "star", "circle", "circle"],
             "background": [None, "white", None, "beige"]}  # None: the prompt names no background
    r = agreement(predicted, named, {"colour": 6, "shape": 5, "background": 4})
    assert (r["colour"]["k"], r["colour"]["n"], r["colour"]["share"]) == (3, 4, 75.0)
    assert (r["shape"]["k"], r["shape"]["n"]) == (2, 4)
    assert (r["background"]["k"], r["background"]["n"]) == (1, 2)  # unnamed items are not scored
    assert r["all"]["k"] == 1 and r["all"]["n"] == 4  # only item 0 has every named attribute right
    assert r["colour"]["chance"] == pytest.approx(100 / 6)
    assert share([])["n"] == 0 and math.isnan(share([])["share"])
    assert r["misread"] == {"colour": {"red -> blue": 1}, "shape": {"circle -> square": 1, "circle -> star": 1},
                            "background": {"beige -> white": 1}}
    assert misread_lines({"samples": r, "real": {"misread": {}}}, top=2) == [
        "- samples: colour red -> blue (1), shape circle -> square (1)"]
    table = markdown_table({"samples": r})
    assert "| samples | 75.0 [" in table and "| chance | 16.7 | 20.0 |" in table


@pytest.mark.slow
def test_classifier_reads_every_attribute_and_rejects_mismatched_prompts(tmp_path):
    spec = ProceduralSpec(resolution=32, max_shapes=1, n_train=800, n_val=10, n_test=120, shape_scale=1.25,
                          shapes=("circle", "square", "triangle"), colours=("red", "green", "blue"))
    data = generate_procedural_dataset(tmp_path / "p", spec, seed=0)
    model, spec = train_attribute_classifier(data, epochs=8)
    paths, labels = single_object_labels(data, "test")
    images = [load_image(p) for p in paths]
    prompts = [f"a {s} {c} {sh} {p} on a {b} background" for s, c, sh, p, b in
               zip(labels["size"], labels["colour"], labels["shape"], [
                   {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "center": "in the center"}[p] for p in labels["position"]], labels["background"])]
    right = prompt_following(model, spec, images, prompts)
    assert right["colour"]["share"] > 90 and right["size"]["share"] > 80 and right["position"]["share"] > 80
    assert right["shape"]["share"] > 60  # chance: 33 %
    assert right["background"]["n"] == len(images)
    # the same images against prompts naming another colour: the figure must collapse
    other = {"red": "green", "green": "blue", "blue": "red"}
    wrong = prompt_following(model, spec, images, [f"a {other[c]} {s}" for c, s in
                                                   zip(labels["colour"], labels["shape"])])
    assert wrong["colour"]["share"] < 10 and wrong["size"]["n"] == 0
    assert prompt_following(model, spec, images[:2], ["a red and blue circle", "nothing"])["skipped"] == 2
