"""dataset.images.load_image: high-bit-depth and float images scaled (not clipped); tiny images warned (issue 15)."""
import numpy as np
import pytest
from PIL import Image

import dataset.images as images
from dataset.images import check_image_size, load_image


def _ramp16(h=64, w=64):
    return (np.arange(h * w, dtype=np.uint32).reshape(h, w) * 65535 // (h * w - 1)).astype(np.uint16)


def test_16bit_png_keeps_its_grey_levels(tmp_path):
    a = _ramp16()
    Image.fromarray(a).save(tmp_path / "g16.png")  # a real 16-bit greyscale PNG
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I;16")
    img = load_image(tmp_path / "g16.png")
    out = np.asarray(img)
    assert img.mode == "RGB" and out.dtype == np.uint8
    assert len(np.unique(out[..., 0])) == 256  # a full 0..65535 ramp spans every 8-bit level
    assert out.min() == 0 and out.max() == 255
    np.testing.assert_array_equal(out[..., 0], np.rint(a / 257.0).astype(np.uint8))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16bit_png_written_big_endian_and_a_dark_one(tmp_path):
    a = _ramp16() // 16  # 0..4095, a 12-bit sensor in a 16-bit file: dark, but not black
    Image.frombytes("I;16B", a.shape[::-1], a.astype(">u2").tobytes()).save(tmp_path / "dark.png")
    out = np.asarray(load_image(tmp_path / "dark.png"))[..., 0]
    assert out.max() == round(4095 / 257) and len(np.unique(out)) > 10


def test_32bit_int_and_float_modes(tmp_path):
    a = _ramp16().astype(np.int32)
    Image.fromarray(a, mode="I").save(tmp_path / "i32.tiff")
    out = np.asarray(load_image(tmp_path / "i32.tiff"))[..., 0]
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) == 256
    f = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(f, mode="F").save(tmp_path / "f01.tiff")
    out = np.asarray(load_image(tmp_path / "f01.tiff"))[..., 0]
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) == 256
    Image.fromarray(f * 255, mode="F").save(tmp_path / "f255.tiff")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "f255.tiff"))[..., 0], out)


def test_8bit_images_are_unchanged(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "rgb.png")), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "l.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "l.png"))[..., 2], rgb[..., 0])


def test_far_smaller_image_warns_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(images, "_warned_small", False)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tmp_path / "dot.png")
    Image.new("RGB", (300, 200)).save(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png", resolution=512).size == (300, 200)
    assert capsys.readouterr().err == ""
    load_image(tmp_path / "dot.png", resolution=512)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dot.png is 1x1, far smaller than the resolution 512" in err
    load_image(tmp_path / "dot.png", resolution=512)
    assert capsys.readouterr().err == ""  # once per process
    assert check_image_size(Image.new("RGB", (8, 8)), 224) is True
    assert check_image_size(Image.new("RGB", (64, 64)), 224) is False


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "CMYK", "1"])
def test_other_modes_still_become_rgb(tmp_path, mode):
    Image.new(mode, (4, 4)).save(tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}")
    assert load_image(tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}").mode == "RGB"


def test_training_and_evaluation_loaders_warn_about_a_tiny_image(tmp_path, monkeypatch, capsys):
    """The warning reaches real runs: the training set built from flags, and the evaluator's split reader."""
    from types import SimpleNamespace

    from dataset.torch_datasets import RetrievalEvalDataset
    from utils.stages.train_data import build_train_dataset

    monkeypatch.setattr(images, "_warned_small", False)
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    (tmp_path / "train.json").write_text('[{"image": "dot.png", "caption": "a dot", "image_id": 0}]')
    args = SimpleNamespace(epoch_unit="images", train_data_dir=None, dataset="karpathy",
                           ann_root=str(tmp_path / "train.json"),
                           image_root=str(tmp_path), max_train_samples=None, seed=0, resolution=32)
    ds = build_train_dataset(args, transform=lambda im: im)
    ds[0]
    assert "dot.png is 1x1, far smaller than the resolution 32" in capsys.readouterr().err
    monkeypatch.setattr(images, "_warned_small", False)
    ev = RetrievalEvalDataset([{"image": "dot.png", "caption": ["a dot"]}], tmp_path, transform=lambda im: im)
    ev.resolution = 64
    ev[0]
    assert "far smaller than the resolution 64" in capsys.readouterr().err
