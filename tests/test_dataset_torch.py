"""torch datasets: per-epoch caption draws and retrieval index maps."""
import pytest
import torch
from PIL import Image

from dataset.distilled import read_distilled_set, write_distilled_set
from dataset.torch_datasets import ImageCaptionTrainDataset, RetrievalEvalDataset, to_tensor
from utils.common.errors import InputError


@pytest.fixture
def root(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(4):
        Image.new("RGB", (6, 6), (i * 60, 10, 20)).save(tmp_path / "images" / f"{i:06d}.png")
    return tmp_path


def _groups():
    return [{"image": f"images/{i:06d}.png", "image_id": str(i), "captions": [f"img{i} cap{k}" for k in range(5)]}
            for i in range(4)]


def test_train_item_and_reproducible_draws(root):
    ds = ImageCaptionTrainDataset(_groups(), root, seed=7)
    item = ds[2]
    assert item["index"] == 2 and item["caption"].startswith("img2 ")
    assert item["pixel_values"].shape == (3, 6, 6)
    assert torch.allclose(item["pixel_values"][:, 0, 0], torch.tensor([120, 10, 20]) / 255.0)
    draws = [[ds[i]["caption"] for i in range(4)] for _ in range(2)]
    assert draws[0] == draws[1], "same epoch, same captions"
    again = ImageCaptionTrainDataset(_groups(), root, seed=7)
    assert [again[i]["caption"] for i in range(4)] == draws[0]
    per_epoch = []
    for epoch in range(6):
        ds.use_epoch(epoch)
        per_epoch.append(tuple(ds.caption_index(i) for i in range(4)))
    assert len(set(per_epoch)) > 1, "captions must change across epochs"
    seen = set()
    for epoch in range(50):
        ds.use_epoch(epoch)
        seen.add(ds.caption_index(0))
    assert seen == set(range(5)), "every caption is eventually drawn"


def test_train_from_entries_and_transform(root):
    entries = [{"image": "images/000001.png", "caption": "only", "image_id": "1"},
               {"image": "images/000000.png", "caption": "first", "image_id": "0"}]
    ds = ImageCaptionTrainDataset.from_train_entries(entries, root, transform=lambda im: to_tensor(im) * 2)
    assert len(ds) == 2 and ds[0]["caption"] == "only"
    assert ds[1]["pixel_values"].max() == pytest.approx(2 * 20 / 255.0)
    with pytest.raises(InputError, match="has no images"):
        ImageCaptionTrainDataset([], root)


def test_train_missing_image_is_named(root):
    ds = ImageCaptionTrainDataset([{"image": "images/404.png", "captions": ["x"]}], root)
    with pytest.raises(InputError, match="image not found: .*404.png"):
        ds[0]


def test_eval_index_maps(root):
    entries = [{"image": "images/000000.png", "caption": ["a", "b"]},
               {"image": "images/000001.png", "caption": ["c"]},
               {"image": "images/000002.png", "caption": ["d", "e", "f"]}]
    ds = RetrievalEvalDataset(entries, root)
    assert ds.texts == ["a", "b", "c", "d", "e", "f"]
    assert ds.img2txt == [[0, 1], [2], [3, 4, 5]]
    assert ds.txt2img == [0, 0, 1, 2, 2, 2]
    image, index = ds[2]
    assert index == 2 and image.shape == (3, 6, 6)
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    images, indices = next(iter(loader))
    assert images.shape == (2, 3, 6, 6) and indices.tolist() == [0, 1]


def test_distilled_set_through_both_classes(root):
    write_distilled_set(root, [{"image": g["image"], "captions": g["captions"][: i + 1]}
                               for i, g in enumerate(_groups())], {})
    distilled = read_distilled_set(root)
    train = ImageCaptionTrainDataset.from_distilled(distilled, seed=0)
    assert len(train) == 4 and train[0]["caption"] == "img0 cap0"
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 6, 6) and len(batch["caption"]) == 4
    assert batch["index"].tolist() == [0, 1, 2, 3]
    evaluation = RetrievalEvalDataset.from_distilled(distilled)
    assert len(evaluation.texts) == 1 + 2 + 3 + 4 and evaluation.img2txt[1] == [1, 2]


def test_no_set_epoch_for_accelerate_to_override(root):
    # accelerate's DataLoaderShard calls dataset.set_epoch(<its iteration counter>), which restarts at 0 after a
    # resume; the caption draw must follow only the training loop's epoch (use_epoch)
    from utils.stages.latent_cache import CaptionOnlyDataset

    ds = ImageCaptionTrainDataset(_groups(), root, seed=7)
    assert not hasattr(ds, "set_epoch") and not hasattr(CaptionOnlyDataset(ds), "set_epoch")
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    loader = Accelerator(cpu=True).prepare(DataLoader(ds, batch_size=2, collate_fn=lambda items: items))
    ds.use_epoch(3)
    expected = [ds.caption_index(i) for i in range(4)]
    list(loader)
    assert ds.epoch == 3 and [ds.caption_index(i) for i in range(4)] == expected


def test_pairs_unit_passes_every_caption_once(root):
    from utils.stages.latent_cache import CaptionOnlyDataset

    images = ImageCaptionTrainDataset(_groups(), root, seed=7)
    pairs = images.with_unit("pairs")
    n_captions = sum(len(g["captions"]) for g in _groups())
    assert len(images) == 4 and len(pairs) == n_captions > 4
    seen = [(pairs[k]["index"], pairs[k]["caption"]) for k in range(len(pairs))]
    assert sorted(seen) == sorted((i, c) for i, g in enumerate(_groups()) for c in g["captions"])
    wrapped = CaptionOnlyDataset(pairs)
    assert len(wrapped) == n_captions and [wrapped[k]["caption"] for k in range(len(wrapped))] == [c for _, c in seen]
    with pytest.raises(InputError, match="--epoch_unit"):
        ImageCaptionTrainDataset(_groups(), root, unit="captions")
