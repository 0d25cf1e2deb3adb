"""Caption cleaning, de-duplication and the per-image cache."""
import pytest

from utils.common.errors import InputError
from utils.stages.captioning.cache import CaptionCache, settings_key
from utils.stages.captioning.cleaning import caption_key, clean_caption, merge_distinct


@pytest.mark.parametrize("raw, expected", [
    ('"A dog runs on the beach."', "A dog runs on the beach."),
    ("“Two cats sleeping.”", "Two cats sleeping."),
    ("The image shows a red bus parked on a street.", "A red bus parked on a street."),
    ("This image depicts two people hiking.", "Two people hiking."),
    ("In this image, a man rides a horse.", "A man rides a horse."),
    ("Caption: a small boat at sea\n\nThis caption describes the boat.", "a small boat at sea"),
    ("  1. a child   with a kite  ", "a child with a kite"),
    ("\n\n", ""),
    (None, ""),
])
def test_clean_caption(raw, expected):
    assert clean_caption(raw) == expected


def test_clean_caption_keeps_boilerplate_when_asked_and_keeps_ordinary_openings():
    assert clean_caption("The image shows a dog.", strip_boilerplate=False) == "The image shows a dog."
    assert clean_caption("A photo of a dog.") == "A photo of a dog."
    assert clean_caption("The imagery of war shows courage.") == "The imagery of war shows courage."


def test_caption_key_and_merge_distinct():
    assert caption_key("A  Dog, running!") == caption_key("a dog running") == "a dog running"
    got = merge_distinct("A dog running.", ["a cat"], ["a dog running", "A cat!", "", "a cow", "a bird"], 3)
    assert got == ["a cat", "a cow", "a bird"]
    assert merge_distinct("x", [], ["a", "b", "c"], 2) == ["a", "b"]


def test_cache_resumes_last_record_and_ignores_other_settings(tmp_path):
    path = tmp_path / "c" / "captions.jsonl"
    key = settings_key({"backend": "gpt", "model": "m"})
    assert key != settings_key({"backend": "gpt", "model": "other"})
    cache = CaptionCache(path, key)
    cache.put("images/0.png", "p0", ["a"])
    cache.put("images/0.png", "p0", ["a", "b"])
    CaptionCache(path, "otherkey").put("images/1.png", "p1", ["z"])
    with open(path, "a") as f:
        f.write('{"image": "images/2.png", "capt')  # killed mid-write
    again = CaptionCache(path, key)
    assert again.get("images/0.png", "p0") == ["a", "b"]
    assert again.get("images/0.png", "another prompt") == []
    assert again.get("images/1.png", "p1") == [] and again.ignored == 1


def test_cache_corrupt_line_is_a_clear_error(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('not json\n{"image": "a", "prompt": "p", "settings": "k", "captions": []}\n')
    with pytest.raises(InputError, match="delete it"):
        CaptionCache(path, "k")
