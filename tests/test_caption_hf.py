"""LLaVA and Llama backends on tiny random-init models saved and loaded through the real loading code.

Captions of a random model are noise: these tests check the mechanics (K-1 cleaned, distinct
captions per image, cached, resumed, clear errors), not quality.
"""
import pytest
import torch
from PIL import Image

import caption_synthesis_llama as llama_script
import caption_synthesis_llava as llava_script
from dataset.distilled import read_distilled_set, write_distilled_set
from utils.common.atomic_io import read_jsonl
from utils.common.errors import InputError
from utils.models.tiny import build_tiny_llama, build_tiny_llava
from utils.stages.captioning.cache import CACHE_FILE
from utils.stages.captioning.cleaning import caption_key


@pytest.fixture(scope="module", autouse=True)
def offline():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava") / "model")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("llama") / "model")


def make_set(folder, n=3):
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        rel = f"images/{i:06d}.png"
        Image.new("RGB", (24, 20), (60 * i, 90, 30)).save(folder / rel)
        records.append({"image": rel, "captions": [f"a green circle number {i} on a grey background"]})
    write_distilled_set(folder, records, {"sampling": {"seed": 1}})
    return folder


def check_output(out, k):
    ds = read_distilled_set(out)
    for r in ds.records:
        caps = r["captions"]
        assert len(caps) == k
        keys = [caption_key(c) for c in caps]
        assert len(set(keys)) == k  # distinct from each other and from the prompt
        assert all("\n" not in c and c == c.strip() and c for c in caps)
    return ds


def test_llava_tiny_model_k_minus_1_captions_cached_and_resumed(tmp_path, tiny_llava, monkeypatch):
    src = make_set(tmp_path / "set")
    out = tmp_path / "out"
    argv = ["--input_dir", str(src), "--output_dir", str(out), "--model", str(tiny_llava), "--cpi", "3",
            "--batch_size", "2", "--max_new_tokens", "6"]
    summary = llava_script.main(llava_script.parse_args(argv))
    assert summary["short"]["count"] == 0 and summary["failed"]["count"] == 0
    ds = check_output(out, 3)
    assert ds.manifest["captions"]["backend"] == "llava"
    assert ds.manifest["captions"]["settings"]["do_sample"] is True
    assert ds.manifest["sampling"] == {"seed": 1}
    assert len(read_jsonl(out / CACHE_FILE)) == 3
    # a rerun loads nothing and generates nothing
    from utils.stages.captioning.llava import LlavaBackend

    monkeypatch.setattr(LlavaBackend, "setup", lambda self: pytest.fail("model loaded on a finished run"))
    summary2 = llava_script.main(llava_script.parse_args(argv))
    assert summary2["resumed_from_cache"] == 3
    assert read_distilled_set(out).records == ds.records


def test_llama_tiny_model_paraphrases(tmp_path, tiny_llama):
    src = make_set(tmp_path / "set", n=2)
    argv = ["--input_dir", str(src), "--inplace", "--model", str(tiny_llama), "--cpi", "2", "--max_new_tokens", "6"]
    summary = llama_script.main(llama_script.parse_args(argv))
    assert summary["num_new_captions"] == 2
    ds = check_output(src, 2)
    assert ds.manifest["captions"]["backend"] == "llama"
    assert "{caption}" in ds.manifest["captions"]["instruction"]


def test_llama_chat_text_holds_the_prompt(tiny_llama):
    from utils.stages.captioning.llama import LlamaBackend

    b = LlamaBackend(model=str(tiny_llama))
    b.setup()
    text = b.chat_text("two red squares")
    assert "two red squares" in text and text.endswith("[assistant] ")


def test_hf_models_not_found_offline_name_what_was_looked_for(tmp_path):
    src = make_set(tmp_path / "set", n=1)
    with pytest.raises(InputError, match="no-such-org/no-such-llava"):
        llava_script.main(llava_script.parse_args(["--input_dir", str(src), "--inplace",
                                                   "--model", "no-such-org/no-such-llava"]))
    with pytest.raises(InputError, match=str(tmp_path / "missing")):
        llama_script.main(llama_script.parse_args(["--input_dir", str(src), "--inplace",
                                                   "--model", str(tmp_path / "missing")]))
    with pytest.raises(InputError, match="caption"):
        llama_script.main(llama_script.parse_args(["--input_dir", str(src), "--inplace",
                                                   "--instruction", "Rewrite it."]))
