"""--protocol lors|edge: the settings each builds, edge's pairs and augmentation, one normalisation per run."""
import pytest
import torch
import torch.nn as nn
from accelerate import Accelerator

import utils.models.retrieval_model as retrieval_model
from evaluation.evaluation import main, parse_args
from evaluation.protocol import (edge_train_augment, protocol_preprocess, protocol_settings,
                                 random_resized_crop_params)
from utils.models.retrieval_model import RetrievalModel
from evaluation.train_retrieval import (EvalSplit, TrainConfig, TrainSet, encoder_input, epoch_batches,
                                        resize_to_uint8, train_retrieval)
from utils.common.errors import InputError

PRE = {"size": 16, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_protocol_settings():
    lors, edge = protocol_settings("lors"), protocol_settings("edge")
    assert (lors.momentum, lors.weight_decay, lors.lr_schedule, lors.batch_size_train) == (0.9, 5e-4, "step", 128)
    assert (lors.pairs, lors.augment, lors.drop_last, lors.epochs) == ("one_caption_per_image", "none", False, 100)
    assert (edge.momentum, edge.weight_decay, edge.lr_schedule, edge.batch_size_train) == (0.0, 0.0, "constant", 32)
    assert (edge.pairs, edge.augment, edge.drop_last, edge.epochs) == ("every_caption", "randaugment", True, 100)
    assert (edge.lr_img, edge.lr_txt, edge.eval_every, edge.image_size, edge.batch_size_test) == (0.1, 0.1, 5, 224, 32)
    assert lors.normalization == edge.normalization == "clip"
    assert "evaluation/evaluation.py L170-171" in edge.sources["momentum, weight_decay"]
    with pytest.raises(InputError, match="--protocol"):
        protocol_settings("mtt")


def test_cli_flags_take_the_protocol_defaults_unless_given(tmp_path):
    base = ["--dataset", "procedural", "--ann_root", str(tmp_path), "--baseline", "full"]
    lors = parse_args(base)
    assert (lors.protocol, lors.momentum, lors.weight_decay, lors.batch_size_train, lors.lr_schedule) == \
        ("lors", 0.9, 5e-4, 128, "step")
    edge = parse_args(base + ["--protocol", "edge"])
    assert (edge.momentum, edge.weight_decay, edge.batch_size_train, edge.batch_size_test, edge.lr_schedule,
            edge.epochs, edge.eval_every, edge.lr_img, edge.lr_txt) == (0.0, 0.0, 32, 32, "constant", 100, 5, 0.1, 0.1)
    mine = parse_args(base + ["--protocol", "edge", "--momentum", "0.5", "--lr_schedule", "step"])
    assert mine.momentum == 0.5 and mine.lr_schedule == "step" and mine.weight_decay == 0.0
    with pytest.raises(InputError, match="--no_aug"):
        parse_args(base + ["--no_aug"])


def test_help_cites_the_public_code(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for cite in ("evaluation/evaluation.py L170-171", "dataset/__init__.py L70-77", "flickr30k_dataset.py L69-70",
                 "LoRS data/__init__.py L57", "ichbill/EDGE"):
        assert cite in out


def test_clip_normalisation_for_nfnet_from_open_clip_constants():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    imagenet = {"size": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    for name in ("lors", "edge"):
        pre = protocol_preprocess(protocol_settings(name), "nfnet_l0", imagenet)
        assert pre["mean"] == tuple(OPENAI_DATASET_MEAN) and pre["std"] == tuple(OPENAI_DATASET_STD)
        assert pre["size"] == 224 and "CLIP" in pre["normalization"]
    lite = {"size": 224, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    assert protocol_preprocess(protocol_settings("lors"), "efficientnet_lite0", lite)["mean"] == (0.5, 0.5, 0.5)


class Recorder(nn.Module):
    """A tiny image encoder that records every input with the mode it ran in."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, x.detach().clone()))
        return self.net(x)


def _two_by_three():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    train = TrainSet(images=images, caption_ids=[[0, 1, 2], [3, 4, 5]], text_features=torch.randn(6, 8))
    test = EvalSplit(name="test", images=images.clone(), text_features=torch.randn(6, 8),
                     img2txt=[[0, 1, 2], [3, 4, 5]], txt2img=[0, 0, 0, 1, 1, 1])
    return train, test


def _cfg(name, **over):
    s = protocol_settings(name)
    fields = dict(epochs=2, eval_every=1, batch_size_train=3, batch_size_test=8, lr_img=s.lr_img, lr_txt=s.lr_txt,
                  momentum=s.momentum, weight_decay=s.weight_decay, lr_schedule=s.lr_schedule, pairs=s.pairs,
                  augment=s.augment, drop_last=s.drop_last)
    return TrainConfig(**{**fields, **over})


def test_edge_expands_captions_into_pairs_and_augments_training_only():
    train, test = _two_by_three()
    edge = _cfg("edge")
    for epoch in (1, 2):
        batches = epoch_batches(train, edge, seed=0, epoch=epoch)
        pairs = sorted((int(i), int(t)) for idx, txt in batches for i, t in zip(idx, txt))
        assert pairs == [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)] and len(batches) == 2
    # drop_last: 6 pairs in batches of 4 -> one batch of 4
    assert [len(i) for i, _ in epoch_batches(train, _cfg("edge", batch_size_train=4), 0, 1)] == [4]
    # lors: each image once per epoch, with one of its own captions
    lors = epoch_batches(train, _cfg("lors", batch_size_train=8), 0, 1)
    assert len(lors) == 1 and sorted(lors[0][0].tolist()) == [0, 1]
    assert all(int(t) // 3 == int(i) for i, t in zip(*lors[0]))

    originals = encoder_input(train.images, PRE)
    for name, augmented in (("edge", True), ("lors", False)):
        enc = Recorder()
        torch.manual_seed(0)
        model = RetrievalModel(enc, text_dim=8, width=4)
        cfg = _cfg(name, batch_size_train=3 if name == "edge" else 8)
        history = train_retrieval(model, train, test, PRE, cfg, Accelerator(cpu=True), seed=0, progress=False)
        assert [h["epoch"] for h in history] == [1, 2]
        trained = [x for training, x in enc.seen if training]
        evaluated = [x for training, x in enc.seen if not training]
        assert len(trained) == (4 if name == "edge" else 2) and len(evaluated) == 2
        for x in evaluated:  # test images: never augmented
            assert torch.allclose(x, originals, atol=1e-6)
        rows = torch.cat(trained)
        exact = [min((r - o).abs().max().item() for o in originals) < 1e-6 for r in rows]
        if augmented:
            assert not all(exact), "edge training images were not augmented"
        else:
            assert all(exact), "lors training images changed"


def test_edge_augment_is_seeded_and_keeps_shape_and_range():
    images = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8)
    a = edge_train_augment(images, torch.Generator().manual_seed(1))
    b = edge_train_augment(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    floats = edge_train_augment(images.float() / 255, torch.Generator().manual_seed(1))
    assert floats.dtype == torch.float32 and floats.shape == images.shape
    for seed in range(20):
        top, left, h, w = random_resized_crop_params(24, 24, torch.Generator().manual_seed(seed))
        assert 0 <= top <= 24 - h and 0 <= left <= 24 - w and h * w >= 0.4 * 24 * 24


@pytest.fixture(scope="module")
def env(tiny_eval_env):
    return tiny_eval_env("protocol", n_train=8, n_val=4, n_test=8)


def _argv(env, out, *extra):
    return [*env["argv"], "--epochs", "1", "--output_dir", str(out), "--no_feature_cache", *extra]


def _record_encoder_inputs(monkeypatch):
    seen = []
    real = retrieval_model.build_retrieval_model

    def build(*a, **k):
        model, pre = real(*a, **k)
        model.image_encoder.register_forward_pre_hook(
            lambda mod, inputs: seen.append((mod.training, inputs[0].detach().clone())))
        return model, pre

    monkeypatch.setattr(retrieval_model, "build_retrieval_model", build)
    return seen


def test_lors_pt_round_trip_matches_the_test_split_preprocessing(env, monkeypatch):
    """A LoRS .pt made from the test images as LoRS saves them (CLIP-normalised) reaches the encoder exactly as
    the test split's own images do."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from dataset.images import load_image
    from dataset.registry import load_split

    entries = load_split("procedural", "test", env["data"])
    pixels = torch.stack([resize_to_uint8(load_image(env["data"] / e["image"]), 32) for e in entries]).float() / 255
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    pt = env["base"] / "from_test.pt"
    torch.save({"image": (pixels - mean) / std, "text": torch.randn(len(entries), 32)}, pt)
    seen = _record_encoder_inputs(monkeypatch)
    res = main(parse_args(_argv(env, env["base"] / "run_pt", "--lors_pt", str(pt))))
    assert res["preprocess"]["mean"] == tuple(OPENAI_DATASET_MEAN)
    trained = torch.cat([x for training, x in seen if training])
    evaluated = torch.cat([x for training, x in seen if not training])
    assert trained.shape == evaluated.shape == (8, 3, 32, 32)
    for row in trained:
        assert min((row - e).abs().max().item() for e in evaluated) < 1e-4
    # the saved tensors themselves are what a LoRS-trained nfnet sees: CLIP space, unchanged
    assert min((trained[0] - e).abs().max().item() for e in (pixels - mean) / std) < 1e-4


def test_edge_protocol_end_to_end(env, monkeypatch):
    from dataset.distilled import write_distilled_set
    from PIL import Image

    folder = env["base"] / "two_by_three"
    (folder / "images").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (32, 32), (200 * i, 90, 40)).save(folder / "images" / f"{i:06d}.png")
    write_distilled_set(folder, [{"image": f"images/{i:06d}.png", "captions": [f"c{i}{k}" for k in range(3)]}
                                 for i in range(2)])
    seen = _record_encoder_inputs(monkeypatch)
    res = main(parse_args(_argv(env, env["base"] / "run_edge", "--distill_dir", str(folder), "--protocol", "edge",
                                "--batch_size_train", "3", "--image_size", "32")))
    assert res["protocol"]["name"] == "edge" and res["protocol"]["pairs"] == "every_caption"
    assert res["config"]["momentum"] == 0.0 and res["train_set"]["n_captions"] == 6
    assert sum(x.shape[0] for training, x in seen if training) == 6  # 6 pairs, 2 full batches of 3
    with pytest.raises(InputError, match="fewer than --batch_size_train 32"):
        main(parse_args(_argv(env, env["base"] / "run_edge32", "--distill_dir", str(folder), "--protocol", "edge",
                              "--batch_size_train", "32", "--image_size", "32")))
