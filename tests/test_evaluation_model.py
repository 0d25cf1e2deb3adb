"""Retrieval model pieces: loss, projection head, selection rules, caching, reports, save/load."""
import math

import pytest
import torch

from evaluation.report import aggregate, append_table_row, format_duration, table_row
from evaluation.train_retrieval import cached_text_features, caption_list_key, eval_epochs, select_entry
from utils.common.errors import InputError
from utils.method.losses import contrastive_loss
from utils.models.encoders import build_image_encoder, build_text_encoder
from utils.models.retrieval_model import (ProjectionHead, RetrievalModel, load_retrieval_model, normalize_pixels,
                                          save_retrieval_model)
from utils.models.tiny import save_tiny_bert, save_tiny_nfnet


def test_contrastive_loss_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits = I / tau; each row's CE = log(1 + exp(-1/tau)); both directions equal
    assert contrastive_loss(img, txt, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert contrastive_loss(img, txt, 0.5).item() == pytest.approx(math.log(1 + math.exp(-2)))
    # asymmetric case: txt0 = img0, txt1 = img0 -> rows differ from columns
    txt2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # i2t: row0 [1,1] -> log2; row1 [0,0] -> log2. t2i: row0 [1,0] -> log(1+e^-1); row1 [1,0] target 1 -> log(1+e)
    expect = (2 * math.log(2) / 2 + (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2) / 2
    assert contrastive_loss(img, txt2, 1.0).item() == pytest.approx(expect)


def test_contrastive_loss_matches_open_clip():
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    ref = ClipLoss()(a, b, torch.tensor(1 / 0.07))
    assert contrastive_loss(a, b, 0.07).item() == pytest.approx(ref.item(), rel=1e-5)


def test_projection_head_is_residual_layernorm():
    torch.manual_seed(0)
    head = ProjectionHead(5, 4).eval()
    x = torch.randn(3, 5)
    h = head.projection(x)
    expect = torch.nn.functional.layer_norm(h + head.fc(torch.nn.functional.gelu(h)), (4,),
                                            head.layer_norm.weight, head.layer_norm.bias)
    torch.testing.assert_close(head(x), expect)
    assert head.dropout.p == 0.1


def test_normalize_pixels():
    x = torch.full((1, 3, 2, 2), 0.75)
    out = normalize_pixels(x, {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.5, 0.5)})
    assert out[0, 0, 0, 0].item() == pytest.approx(1.0) and out[0, 1, 0, 0].item() == pytest.approx(0.5)


def test_eval_epochs_and_selection():
    assert eval_epochs(12, 5) == [5, 10, 12]
    assert eval_epochs(3, 5) == [3]
    history = [{"epoch": 1, "loss": 1.0}] + [
        {"epoch": e, "loss": 0.5, "test": {"r_mean": t}, "val": {"r_mean": v}}
        for e, t, v in [(2, 10.0, 30.0), (4, 40.0, 20.0), (6, 20.0, 30.0)]]
    assert select_entry(history, "last")["epoch"] == 6
    assert select_entry(history, "best_test")["epoch"] == 4
    assert select_entry(history, "best_val")["epoch"] == 2  # tie on val -> earliest
    with pytest.raises(InputError):
        select_entry([{"epoch": 1, "test": {"r_mean": 1.0}}], "best_val")


def test_text_feature_cache_memory_and_disk(tmp_path, monkeypatch):
    enc = build_text_encoder(f"bert:{save_tiny_bert(tmp_path / 'bert')}")
    captions = ["a red circle", "a blue square", "a green star"]
    calls = []
    real = enc.encode
    monkeypatch.setattr(enc, "encode", lambda texts, batch_size=64: calls.append(len(texts)) or real(texts, batch_size))
    first = cached_text_features(enc, captions, tmp_path / "cache")
    again = cached_text_features(enc, captions, tmp_path / "cache")
    assert calls == [3] and again is first
    from evaluation import train_retrieval

    train_retrieval._MEMORY_CACHE.clear()
    from_disk = cached_text_features(enc, captions, tmp_path / "cache")
    assert calls == [3]
    torch.testing.assert_close(from_disk, first)
    torch.testing.assert_close(first, real(captions))
    assert caption_list_key("a", ["x", "y"]) != caption_list_key("a", ["xy"])
    assert caption_list_key("a", ["x"]) != caption_list_key("b", ["x"])


def test_report_row_and_table(tmp_path):
    keys = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean")
    summary = aggregate([{k: 10.0 for k in keys}, {k: 20.0 for k in keys}])
    assert summary["r_mean"]["mean"] == 15.0 and summary["r_mean"]["std"] == pytest.approx(7.0710678)
    row = table_row("set | run", "last epoch", summary, [0, 1], 125)
    assert row.startswith("| set / run | last epoch | 15.0 ± 7.1 |") and row.endswith("| 0,1 | 2m05s |")
    path = tmp_path / "t.md"
    append_table_row(path, row)
    append_table_row(path, row)
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| run | selection | IR@1") and lines[2] == lines[3] == row
    assert format_duration(3725) == "1h02m"


def test_save_and_load_retrieval_model(tmp_path):
    nf = save_tiny_nfnet(tmp_path / "nf")
    bert = save_tiny_bert(tmp_path / "bert")
    enc, pre, width = build_image_encoder(f"local-dir:{nf}")
    text_encoder = build_text_encoder(f"bert:{bert}")
    torch.manual_seed(1)
    model = RetrievalModel(enc, text_encoder.dim, width).eval()
    pre = {**pre, "size": 32}
    save_retrieval_model(model, tmp_path / "m", {"image_encoder": f"local-dir:{nf}",
                                                 "text_encoder": f"bert:{bert}", "text_dim": text_encoder.dim,
                                                 "preprocess": pre})
    loaded, loaded_text, loaded_pre = load_retrieval_model(tmp_path / "m", "cpu")
    assert loaded_pre["size"] == 32 and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model.image_features(x), loaded.image_features(x)
        torch.testing.assert_close(a, b)
        assert torch.allclose(a.norm(dim=-1), torch.ones(2))
        t = loaded.encode_captions(loaded_text, ["a red circle", "a blue cross"])
        torch.testing.assert_close(t, model.encode_captions(text_encoder, ["a red circle", "a blue cross"]))
        assert t.shape == (2, width)
    with pytest.raises(InputError, match="retrieval_config.json"):
        load_retrieval_model(tmp_path / "nothing", "cpu")
