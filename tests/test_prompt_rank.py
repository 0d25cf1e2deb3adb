"""Prompt following by retrieval rank (data without attribute labels)."""
import pytest
import torch

from demo.prompt_rank import own_prompt_top1, prompt_rank_share


def test_own_prompt_top1_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.2],
                        [0.5, 0.4, 0.1],   # its own prompt (0.4) is beaten by prompt 0
                        [0.3, 0.3, 0.3]])  # a tie is not a win
    assert own_prompt_top1(sim).tolist() == [True, False, False]


class _ColourScorer:
    """Image feature: mean RGB; text feature: the RGB the caption's colour word names."""
    RGB = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}

    def encode_image(self, x):
        return torch.nn.functional.normalize(x.mean(dim=(2, 3)), dim=-1)

    def encode_text(self, prompts):
        return torch.nn.functional.normalize(torch.tensor([self.RGB[p] for p in prompts]), dim=-1)


def test_prompt_rank_share_blocks_and_leftovers():
    from PIL import Image

    colours = ["red", "green", "blue"] * 2 + ["red"]  # 7 items: two blocks of 3, one leftover
    images = [Image.new("RGB", (8, 8), tuple(int((c + 1) * 127.5) for c in _ColourScorer.RGB[n])) for n in colours]
    right = prompt_rank_share(_ColourScorer(), images, colours, resolution=8, block=3)
    assert (right["k"], right["n"]) == (6, 6) and right["chance"] == pytest.approx(100 / 3)
    shifted = colours[1:] + colours[:1]
    assert prompt_rank_share(_ColourScorer(), images, shifted, resolution=8, block=3)["k"] == 0


class _WrongScorer(_ColourScorer):
    """Reads every image as the next colour: never ranks the own prompt first."""
    NEXT = {"red": "green", "green": "blue", "blue": "red"}

    def encode_text(self, prompts):
        return super().encode_text([self.NEXT[p] for p in prompts])


def test_measure_prompt_ranks_reads_each_set_once_for_every_scorer(tmp_path, monkeypatch):
    from PIL import Image

    import dataset.images
    import utils.models.scorers
    from dataset.distilled import write_distilled_set
    from demo.prompt_rank import measure_prompt_ranks

    folder = tmp_path / "set"
    (folder / "images").mkdir(parents=True)
    colours = ["red", "green", "blue"]
    for i, n in enumerate(colours):
        Image.new("RGB", (8, 8), tuple(int((c + 1) * 127.5) for c in _ColourScorer.RGB[n])).save(
            folder / "images" / f"{i}.png")
    write_distilled_set(folder, [{"image": f"images/{i}.png", "captions": [n]} for i, n in enumerate(colours)])
    loads = []
    original = dataset.images.load_image
    monkeypatch.setattr(dataset.images, "load_image", lambda p: loads.append(p) or original(p))
    scorers = {"right": _ColourScorer(), "wrong": _WrongScorer()}
    for s in scorers.values():
        s.image_size = (8, 8)
    monkeypatch.setattr(utils.models.scorers, "build_scorer", lambda spec: scorers[spec])
    out = measure_prompt_ranks({"a": "right", "b": "wrong"}, {"set": folder}, block=3)
    assert (out["a"]["set"]["k"], out["b"]["set"]["k"], out["a"]["set"]["n"]) == (3, 0, 3)
    assert len(loads) == 3  # each image read once, not once per scorer
