"""Hard-negative batches: every full batch comes from one cluster, the order is a permutation, images rarely repeat."""
import torch

from utils.stages.hard_negatives import HardNegativeSampler, image_text_features, similar_caption_order


def _two_blobs(n_per: int):
    """Image features in two far-apart groups: images 0..n_per-1 near +e0, the rest near +e1."""
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([1.0, 0.0, 0.0]) + 0.01 * torch.randn(n_per, 3, generator=g)
    b = torch.tensor([0.0, 1.0, 0.0]) + 0.01 * torch.randn(n_per, 3, generator=g)
    return torch.cat([a, b])


def test_each_full_batch_is_cut_from_one_cluster_and_every_item_appears_once():
    feats = _two_blobs(16)  # 32 images, batch 8 -> k = 32 // 16 = 2 clusters: the two blobs
    item_image = [i for i in range(32) for _ in range(2)]  # two items (pairs) per image
    order = similar_caption_order(feats, item_image, batch_size=8, seed=1)
    assert sorted(order) == list(range(64))
    for s in range(0, 64, 8):
        blobs = {item_image[k] // 16 for k in order[s:s + 8]}
        images = [item_image[k] for k in order[s:s + 8]]
        assert len(blobs) == 1, order[s:s + 8]
        assert len(set(images)) == 8  # a cluster of 16 images: no image twice in a batch


def test_leftovers_make_mixed_batches_and_the_partial_batch_stays_last():
    feats = _two_blobs(5)  # 10 images, one item each, batch 4 -> k = 1: one cluster of 10
    order = similar_caption_order(feats, list(range(10)), batch_size=4, seed=0)
    assert sorted(order) == list(range(10)) and len(order) == 10


def test_sampler_is_fixed_by_seed_and_epoch():
    feats = _two_blobs(16)
    s = HardNegativeSampler(feats, list(range(32)), 8, seed=3)
    first = list(s)
    assert list(s) == first
    s.use_epoch(1)
    assert list(s) != first and sorted(s) == sorted(first) and len(s) == 32


def test_image_features_are_the_normalised_mean_of_their_captions():
    vectors = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [3.0, 0.0]}
    encode = lambda caps: torch.tensor([vectors[c] for c in caps])  # noqa: E731
    feats = image_text_features([{"captions": ["a", "b"]}, {"captions": ["c"]}], encode, batch_size=2)
    h = 2 ** -0.5
    assert torch.allclose(feats, torch.tensor([[h, h], [1.0, 0.0]]))
