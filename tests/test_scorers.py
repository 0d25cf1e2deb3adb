"""Scorers: normalised features, gradients to the pixels, per-caption text cache, clear errors."""
import os

import pytest
import torch

from utils.common.errors import InputError
from utils.models.scorers import build_scorer
from utils.models.tiny import build_tiny_hf_clip

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_hf_clip(tmp_path_factory.mktemp("clip") / "tiny_clip", image_size=32)


def _check_scorer(scorer, size):
    pixels = (torch.rand(3, 3, size, size) * 2 - 1).requires_grad_(True)
    u = scorer.encode_image(pixels)
    assert torch.allclose(u.norm(dim=-1), torch.ones(3), atol=1e-5)
    u[:, 0].sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert not any(p.requires_grad for m in scorer.modules() for p in m.parameters())
    calls = []
    original = scorer._text_features
    scorer._text_features = lambda caps: (calls.append(list(caps)), original(caps))[1]
    v1 = scorer.encode_text(["a red circle", "a blue square", "a red circle"])
    v2 = scorer.encode_text(["a blue square", "a green star"])
    assert calls == [["a red circle", "a blue square"], ["a green star"]]
    assert torch.allclose(v1[1], v2[0]) and torch.allclose(v1[0], v1[2])
    assert torch.allclose(v1.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert u.shape[1] == v1.shape[1]


def test_hf_clip_tiny(tiny_clip):
    scorer = build_scorer(f"hf_clip:{tiny_clip}")
    assert scorer.image_size == (32, 32)
    _check_scorer(scorer, 48)  # resized inside the graph


def test_preprocess_is_resize_and_clip_normalisation(tiny_clip):
    scorer = build_scorer(f"hf_clip:{tiny_clip}")
    x = torch.zeros(1, 3, 32, 32)  # mid-grey in [-1, 1] -> 0.5 in [0, 1]
    expected = (0.5 - torch.tensor(scorer.mean)) / torch.tensor(scorer.std)
    assert torch.allclose(scorer.preprocess(x)[0, :, 0, 0], expected, atol=1e-5)


def test_open_clip_random_init():
    scorer = build_scorer("open_clip:ViT-S-32")
    assert scorer.image_size == (224, 224)
    _check_scorer(scorer, 32)


def test_retrieval_scorer(tmp_path):
    from utils.models.retrieval_model import build_retrieval_model, save_retrieval_model

    model, preprocess = build_retrieval_model("open_clip:ViT-S-32", text_dim=384, pretrained=False)
    save_retrieval_model(model, tmp_path / "ret", {"image_encoder": "open_clip:ViT-S-32", "text_encoder": "minilm",
                                                   "text_dim": 384, "preprocess": preprocess})
    scorer = build_scorer(f"retrieval:{tmp_path / 'ret'}")
    _check_scorer(scorer, 32)


@pytest.mark.parametrize("spec", ["clip", "nope:x", "hf_clip:/does/not/exist", "retrieval:/does/not/exist",
                                  "open_clip:No-Such-Model", "open_clip:ViT-S-32//missing/weights.bin"])
def test_bad_specs(spec):
    with pytest.raises(InputError):
        build_scorer(spec)


def test_offline_pretrained_tag_is_a_clear_error():
    with pytest.raises(InputError, match="could not load open_clip weights"):
        build_scorer("open_clip:ViT-S-32/datacomp_m_s128m_b4k")


def test_ensemble_similarity_is_the_mean_of_member_cosines(tiny_clip, tmp_path):
    from utils.models.retrieval_model import build_retrieval_model, save_retrieval_model
    from utils.models.scorers import EnsembleScorer

    model, preprocess = build_retrieval_model("open_clip:ViT-S-32", text_dim=384, pretrained=False)
    save_retrieval_model(model, tmp_path / "ret", {"image_encoder": "open_clip:ViT-S-32", "text_encoder": "minilm",
                                                   "text_dim": 384, "preprocess": preprocess})
    a, b = build_scorer(f"hf_clip:{tiny_clip}"), build_scorer(f"retrieval:{tmp_path / 'ret'}")
    both = build_scorer(f"hf_clip:{tiny_clip}+retrieval:{tmp_path / 'ret'}")
    assert isinstance(both, EnsembleScorer) and both.image_size == (224, 224)  # the larger member's input
    pixels = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    u = both.encode_image(pixels)
    assert torch.allclose(u.norm(dim=-1), torch.ones(2), atol=1e-5)
    u[:, 0].sum().backward()
    assert pixels.grad.abs().sum() > 0
    assert not any(p.requires_grad for m in both.modules() for p in m.parameters())
    pixels = pixels.detach()
    captions = ["a red circle", "a blue square", "a green star"]
    expected = (a.encode_image(pixels) @ a.encode_text(captions).T + b.encode_image(pixels) @ b.encode_text(captions).T) / 2
    assert torch.allclose(both.encode_image(pixels) @ both.encode_text(captions).T, expected, atol=1e-5)


@pytest.mark.parametrize("spec", ["retrieval:/x+", "+retrieval:/x", "retrieval:/does/not/exist+hf_clip:/nope"])
def test_bad_ensemble_specs(spec):
    with pytest.raises(InputError):
        build_scorer(spec)
