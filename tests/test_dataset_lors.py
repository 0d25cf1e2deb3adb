"""LoRS .pt distilled sets."""
import pytest
import torch

from dataset.lors import read_lors_pt
from utils.common.errors import InputError


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_reads_lors_layout(tmp_path):
    n = 4
    obj = {"image": torch.randn(n, 3, 8, 8), "text": torch.randn(n, 768),
           "similarity_params": [torch.randn(n, 2), torch.randn(2, n)], "similarity_mat": torch.eye(n),
           "syn_lr_img": torch.tensor(0.1), "syn_lr_txt": torch.tensor(0.2)}
    s = read_lors_pt(_save(tmp_path / "distilled_1999.pt", obj))
    assert len(s) == 4 and s.images.shape == (4, 3, 8, 8) and s.text_embed.shape == (4, 768)
    assert torch.equal(s.images, obj["image"]) and torch.equal(s.text_embed, obj["text"])
    assert set(s.extras) == {"similarity_params", "similarity_mat", "syn_lr_img", "syn_lr_txt"}
    assert float(s.extras["syn_lr_txt"]) == pytest.approx(0.2)


@pytest.mark.parametrize("obj, expected", [
    ({"text": torch.randn(2, 8)}, "missing key 'image'"),
    ({"image": torch.randn(2, 3, 4, 4)}, "missing key 'text'"),
    ({"image": torch.randn(2, 4, 4), "text": torch.randn(2, 8)}, r"'image' must have shape \[N,3,H,W\]"),
    ({"image": torch.randn(2, 3, 4, 4), "text": torch.randn(3, 8)}, "'image' has 2 items but 'text' has 3"),
    ({"image": torch.randn(2, 3, 4, 4), "text": torch.randn(2, 8, 1)}, r"'text' must have shape \[N,D\]"),
    ({"image": torch.randn(2, 3, 4, 4), "text": torch.randn(2, 8), "similarity_mat": torch.eye(3)},
     "'similarity_mat' must be"),
    ([1, 2], "expected a dict"),
])
def test_validation(tmp_path, obj, expected):
    path = _save(tmp_path / "bad.pt", obj)
    with pytest.raises(InputError, match=expected) as e:
        read_lors_pt(path)
    assert "bad.pt" in str(e.value)


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(InputError, match="LoRS distilled set not found: .*none.pt"):
        read_lors_pt(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match="could not load LoRS file .*junk.pt"):
        read_lors_pt(tmp_path / "junk.pt")
