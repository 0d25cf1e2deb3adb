"""CC3M: img2dataset folders and webdataset shards."""
import io

import pytest
import webdataset as wds
from PIL import Image

from dataset.cc3m import cc3m_eval_entries, iter_cc3m_shards, read_cc3m_folder
from dataset.registry import load_split
from utils.common.errors import InputError


def _jpg(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _img2dataset_folder(root):
    _jpg(root / "00000" / "000000000.jpg", (255, 0, 0))
    (root / "00000" / "000000000.txt").write_text("a red square\n")
    _jpg(root / "00000" / "000000001.jpg", (0, 255, 0))
    (root / "00000" / "000000001.txt").write_text("a green field")
    _jpg(root / "00001" / "000010000.jpg", (0, 0, 255))
    (root / "00001" / "000010000.json").write_text('{"caption": "blue sky", "url": "u"}')
    (root / "00000.parquet").write_bytes(b"")  # other img2dataset files are ignored
    return root


def test_read_folder(tmp_path):
    root = _img2dataset_folder(tmp_path / "cc3m")
    entries = read_cc3m_folder(root)
    assert entries == [
        {"image": "00000/000000000.jpg", "caption": "a red square", "image_id": "000000000"},
        {"image": "00000/000000001.jpg", "caption": "a green field", "image_id": "000000001"},
        {"image": "00001/000010000.jpg", "caption": "blue sky", "image_id": "000010000"},
    ]
    assert cc3m_eval_entries(root)[1] == {"image": "00000/000000001.jpg", "caption": ["a green field"]}


def test_flat_folder_and_registry(tmp_path):
    flat = tmp_path / "cc3m" / "val"
    _jpg(flat / "a.jpg", (1, 1, 1))
    (flat / "a.txt").write_text("one")
    assert read_cc3m_folder(flat)[0]["image"] == "a.jpg"
    entries = load_split("cc3m", "val", tmp_path / "cc3m")
    assert entries == [{"image": "a.jpg", "caption": ["one"]}]


def test_folder_errors(tmp_path):
    with pytest.raises(InputError, match="CC3M folder not found"):
        read_cc3m_folder(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        read_cc3m_folder(tmp_path / "empty")
    _jpg(tmp_path / "f" / "x.jpg", (0, 0, 0))
    with pytest.raises(InputError, match=r"no caption for .*x.jpg: expected x.txt"):
        read_cc3m_folder(tmp_path / "f")
    (tmp_path / "f" / "x.txt").write_text("  ")
    with pytest.raises(InputError, match="empty caption for .*x.jpg"):
        read_cc3m_folder(tmp_path / "f")


def _shard(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for key, colour, caption in samples:
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), colour).save(buf, format="JPEG")
            sample = {"__key__": key, "jpg": buf.getvalue()}
            if caption is not None:
                sample["txt"] = caption
            sink.write(sample)
    return path


def test_webdataset_shards(tmp_path):
    a = _shard(tmp_path / "00000.tar", [("000000000", (250, 0, 0), "red"), ("000000001", (0, 250, 0), "green")])
    b = _shard(tmp_path / "00001.tar", [("000010000", (0, 0, 250), "blue")])
    items = list(iter_cc3m_shards([a, b]))
    assert [(c, k) for _, c, k in items] == [("red", "000000000"), ("green", "000000001"), ("blue", "000010000")]
    image = items[2][0]
    assert image.mode == "RGB" and image.size == (8, 8) and image.getpixel((4, 4))[2] > 200
    pattern = str(tmp_path / "{00000..00001}.tar")
    assert len(list(iter_cc3m_shards(pattern))) == 3


def test_webdataset_errors(tmp_path):
    with pytest.raises(InputError, match="webdataset shard not found"):
        list(iter_cc3m_shards(tmp_path / "missing.tar"))
    bad = _shard(tmp_path / "bad.tar", [("k1", (0, 0, 0), None)])
    with pytest.raises(InputError, match="sample k1 has no caption"):
        list(iter_cc3m_shards(bad))
    with wds.TarWriter(str(tmp_path / "corrupt.tar")) as sink:
        sink.write({"__key__": "k2", "jpg": b"not a jpeg", "txt": "caption"})
    with pytest.raises(InputError, match=r"corrupt.tar: sample k2: could not decode jpg"):
        list(iter_cc3m_shards(tmp_path / "corrupt.tar"))
