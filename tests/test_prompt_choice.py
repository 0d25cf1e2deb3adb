"""Beyond-the-paper choices of the sampling stage: prompt choice by coverage and best-of-k candidates."""
import pytest
import torch
from PIL import Image

from utils.common.errors import InputError
from utils.stages import best_of, prompt_coverage, sampling_prompts


def _blobs():
    """Three tight groups in 2-D: 30, 5 and 5 points around (0,1), (1,0) and (-1,0)."""
    g = torch.Generator().manual_seed(0)
    centres = [(0.0, 1.0)] * 30 + [(1.0, 0.0)] * 5 + [(-1.0, 0.0)] * 5
    return torch.tensor(centres) + 0.01 * torch.randn(40, 2, generator=g)


def test_kmeans_finds_separated_groups():
    x = _blobs()
    centres, assign = prompt_coverage.kmeans(x, 3, seed=0)
    # every group is one cluster, whatever the numbering
    assert len({int(a) for a in assign[:30]}) == 1
    assert len({int(a) for a in assign[30:35]}) == 1 and len({int(a) for a in assign[35:]}) == 1
    assert len(set(assign.tolist())) == 3


def test_coverage_takes_one_row_per_group_where_random_follows_density():
    x = _blobs()
    chosen = prompt_coverage.coverage_choice(x, 3, seed=0)
    assert len(chosen) == 3 and len(set(chosen)) == 3
    groups = {0 if i < 30 else (1 if i < 35 else 2) for i in chosen}
    assert groups == {0, 1, 2}
    assert chosen == prompt_coverage.coverage_choice(x, 3, seed=0)  # deterministic


def test_coverage_of_all_rows_returns_every_row():
    x = _blobs()[:6]
    assert prompt_coverage.coverage_choice(x, 6, seed=1) == list(range(6))


def _entries():
    words = ["red circle"] * 8 + ["blue square", "green star"]
    return [{"image": f"im{i}.png", "image_id": f"id{i}", "caption": f"a {w}"} for i, w in enumerate(words)]


def _bag_of_words(texts):
    vocab = ["red", "circle", "blue", "square", "green", "star"]
    return torch.tensor([[float(v in t.split()) for v in vocab] for t in texts])


def test_draw_prompts_coverage_picks_the_rare_captions():
    drawn = sampling_prompts.draw_prompts(_entries(), 3, seed=0, selection="coverage", text_features=_bag_of_words)
    prompts = sorted(d["prompt"] for d in drawn)
    assert prompts == ["a blue square", "a green star", "a red circle"]
    assert len({d["image"] for d in drawn}) == 3


def test_draw_prompts_random_is_unchanged_by_the_new_option():
    a = sampling_prompts.draw_prompts(_entries(), 3, seed=5)
    assert a == sampling_prompts.draw_prompts(_entries(), 3, seed=5, selection="random")


def test_draw_prompts_rejects_unknown_selection():
    with pytest.raises(InputError, match="prompt selection"):
        sampling_prompts.draw_prompts(_entries(), 3, seed=0, selection="best")


def test_candidate_zero_is_the_plain_sampling_seed():
    from utils.common.seeding import derive_seed

    assert best_of.candidate_seed(3, 7, 0) == derive_seed(3, 7)
    seeds = {best_of.candidate_seed(3, 7, j) for j in range(4)}
    assert len(seeds) == 4


class _ColourScorer:
    """Scores an image by its mean red (prompt 'red') or blue (otherwise) channel."""

    def encode_text(self, prompts):
        return torch.tensor([[1.0, 0.0] if p == "red" else [0.0, 1.0] for p in prompts])

    def encode_image(self, pixels):
        return torch.stack([pixels[:, 0].mean((1, 2)), pixels[:, 2].mean((1, 2))], dim=1)


def test_best_of_keeps_the_candidate_that_matches_its_prompt():
    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    candidates = [[blue, red], [red, blue]]  # candidate j of items 0 ("red") and 1 ("blue")
    scores = best_of.candidate_scores(_ColourScorer(), candidates, ["red", "blue"])
    assert scores.shape == (2, 2)
    assert best_of.pick_best(scores) == [1, 1]
    assert best_of.pick_best(torch.zeros(3, 2)) == [0, 0]  # ties keep the plain sample


def test_pil_to_pixels_range():
    px = best_of.pil_to_pixels([Image.new("RGB", (2, 2), (255, 0, 128))])
    assert px.shape == (1, 3, 2, 2)
    assert torch.allclose(px[0, :, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)


def test_sampling_stage_keeps_the_best_candidate_and_k1_is_plain_sampling(tmp_path):
    """End to end on a tiny SD and a tiny retrieval scorer: every written image is the candidate the scorer
    ranks highest for its prompt; the plain set is candidate 0."""
    import numpy as np

    from dataset.distilled import read_distilled_set
    from edge_diffusion_sampling import main, parse_args
    from utils.models.retrieval_model import build_retrieval_model, save_retrieval_model
    from utils.models.scorers import build_scorer
    from utils.models.tiny import build_tiny_sd
    from utils.stages.sampling import PromptEncoder, load_sampling_pipeline, render_images

    sd = build_tiny_sd(tmp_path / "sd", resolution=32)
    model, preprocess = build_retrieval_model("open_clip:ViT-S-32", text_dim=384, pretrained=False)
    save_retrieval_model(model, tmp_path / "ret", {"image_encoder": "open_clip:ViT-S-32", "text_encoder": "minilm",
                                                   "text_dim": 384, "preprocess": preprocess})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green star\n")
    base = ["--pretrained_model_name_or_path", str(sd), "--prompts_file", str(prompts), "--num_inference_steps", "2",
            "--seed", "3", "--preview_n", "0", "--no_progress"]
    plain = read_distilled_set(main(parse_args(base + ["--output_dir", str(tmp_path / "k1")])))
    best = read_distilled_set(main(parse_args(base + ["--output_dir", str(tmp_path / "k3"), "--best_of", "3",
                                                      "--best_of_scorer", f"retrieval:{tmp_path / 'ret'}"])))
    assert best.manifest["best_of"] == 3 and "best_of" not in plain.manifest

    pipe = load_sampling_pipeline(str(sd))
    texts = [r["captions"][0] for r in plain.records]
    # one image per call, as the stage's batch size 1 renders them
    cands = [[render_images(pipe, PromptEncoder(pipe), [t], [i], 3, 2, 7.5, 32, 32, candidate=j)[0]
              for i, t in enumerate(texts)] for j in range(3)]
    arr = lambda im: np.asarray(im.convert("RGB"))  # noqa: E731
    for i, r in enumerate(plain.records):
        assert np.array_equal(arr(Image.open(plain.folder / r["image"])), arr(cands[0][i]))
    choice = best_of.pick_best(best_of.candidate_scores(build_scorer(f"retrieval:{tmp_path / 'ret'}"), cands, texts))
    for i, r in enumerate(best.records):
        assert np.array_equal(arr(Image.open(best.folder / r["image"])), arr(cands[choice[i]][i]))


def test_coverage_in_a_scorers_text_space(tmp_path):
    """scorer:<spec> featurizes captions with the scorer's text tower, in chunks, equal to the scorer's own call."""
    from utils.models.retrieval_model import build_retrieval_model, save_retrieval_model
    from utils.models.scorers import build_scorer

    model, preprocess = build_retrieval_model("open_clip:ViT-S-32", text_dim=384, pretrained=False)
    save_retrieval_model(model, tmp_path / "ret", {"image_encoder": "open_clip:ViT-S-32", "text_encoder": "minilm",
                                                   "text_dim": 384, "preprocess": preprocess})
    featurize = prompt_coverage.caption_featurizer(f"scorer:retrieval:{tmp_path / 'ret'}", batch_size=3)
    captions = [e["caption"] for e in _entries()]
    feats = featurize(captions)
    assert feats.shape[0] == len(captions)
    assert torch.allclose(feats, build_scorer(f"retrieval:{tmp_path / 'ret'}").encode_text(captions).cpu(), atol=1e-5)
    drawn = sampling_prompts.draw_prompts(_entries(), 3, seed=0, selection="coverage", text_features=featurize)
    assert len({d["image"] for d in drawn}) == 3
    with pytest.raises(InputError, match="retrieval model folder not found"):
        prompt_coverage.caption_featurizer("scorer:retrieval:/does/not/exist")
