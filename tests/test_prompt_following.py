"""The prompt-following figure of the demo report."""
import math

import pytest

from dataset.procedural import ProceduralSpec, generate_procedural_dataset
from dataset.images import load_image
from demo.prompt_following import agreement, prompt_following, single_object_labels, train_attribute_classifier


def test_agreement_by_hand():
    r = agreement(["red", "blue", "red", "green"], ["circle", "star", "square", "star"],
                  ["red", "red", "red", "green"], ["circle", "star", "circle", "circle"])
    assert r["colour"] == 75.0 and r["shape"] == 50.0 and r["both"] == 25.0 and r["n"] == 4
    assert math.isnan(agreement([], [], [], [])["colour"])


@pytest.mark.slow
def test_classifier_reads_real_images_and_rejects_mismatched_prompts(tmp_path):
    spec = ProceduralSpec(resolution=32, max_shapes=1, n_train=600, n_val=10, n_test=100,
                          shapes=("circle", "square", "triangle"), colours=("red", "green", "blue"))
    data = generate_procedural_dataset(tmp_path / "p", spec, seed=0)
    model, spec = train_attribute_classifier(data, epochs=6)
    paths, colours, shapes = single_object_labels(data, "test")
    images = [load_image(p) for p in paths]
    right = prompt_following(model, spec, images, [f"a {c} {s}" for c, s in zip(colours, shapes)])
    assert right["colour"] > 90 and right["shape"] > 55  # chance: 33 %
    # the same images against prompts naming another colour: the figure must collapse
    other = {"red": "green", "green": "blue", "blue": "red"}
    wrong = prompt_following(model, spec, images, [f"a {other[c]} {s}" for c, s in zip(colours, shapes)])
    assert wrong["colour"] < 10
    assert prompt_following(model, spec, images[:2], ["a red and blue circle", "nothing"])["skipped"] == 2
