"""EDGE losses against hand-computed values on 3x2 inputs, symmetry, range, and open_clip's ClipLoss."""
import math

import pytest
import torch
import torch.nn.functional as F

from utils.method.losses import (GatheredEDGELosses, contrastive_loss, diversity_loss, mean_off_diagonal,
                                 noise_mse_loss, retrieval_top1, same_caption_positives)

# u_i, v_i already unit vectors: S = u @ v.T = [[1,0,0],[0,1,1],[1,0,0]]
U = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
V = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])


def test_contrastive_hand_value():
    e = math.exp(-10)
    # rows of S/0.1 with the diagonal as target: [10,0,0]->0, [0,10,10]->1, [10,0,0]->2
    i2t = [math.log(1 + 2 * e), math.log(2 + e), 10 + math.log(1 + 2 * e)]
    # rows of S.T/0.1: [10,0,10]->0, [0,10,0]->1, [0,10,0]->2
    t2i = [math.log(2 + e), math.log(1 + 2 * e), 10 + math.log(1 + 2 * e)]
    expected = (sum(i2t) / 3 + sum(t2i) / 3) / 2
    assert contrastive_loss(U, V, 0.1).item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_normalises_inputs_and_is_symmetric():
    torch.manual_seed(0)
    u, v = torch.randn(5, 8), torch.randn(5, 8)
    assert contrastive_loss(3 * U, 0.5 * V).item() == pytest.approx(contrastive_loss(U, V).item(), rel=1e-6)
    assert contrastive_loss(u, v).item() == pytest.approx(contrastive_loss(v, u).item(), rel=1e-6)
    # matching pairs cost less than shuffled ones
    assert contrastive_loss(u, u).item() < contrastive_loss(u, u.roll(1, 0)).item()


def test_contrastive_equals_open_clip_cliploss():
    from open_clip.loss import ClipLoss

    torch.manual_seed(1)
    u, v = torch.randn(6, 16), torch.randn(6, 16)
    ref = ClipLoss()(F.normalize(u, dim=-1), F.normalize(v, dim=-1), logit_scale=1 / 0.1)
    assert contrastive_loss(u, v, 0.1).item() == pytest.approx(ref.item(), rel=1e-6)
    gathered = GatheredEDGELosses(0.1, rank=0, world_size=1)(u, v)
    assert gathered["contrastive"].item() == pytest.approx(ref.item(), rel=1e-6)
    assert gathered["diversity"].item() == pytest.approx(diversity_loss(u, v).item(), rel=1e-6)


def test_diversity_hand_values():
    # joint vectors [u_i, v_i]/sqrt2: w0.w1 = 0, w0.w2 = 1/2, w1.w2 = 1/2 -> mean 1/3
    assert diversity_loss(U, V, "image_text").item() == pytest.approx(1 / 3, rel=1e-6)
    # 6 stacked points u0=[1,0], u1=[0,1], u2=[1,0], v0=[1,0], v1=[0,1], v2=[0,1]: of the 15 pairs the 3 matched
    # ones (u_i, v_i) are left out; of the other 12, four have cosine 1 (u0-u2, u2-v0, u1-v2, v1-v2) -> 4 / 12
    assert diversity_loss(U, V, "image_text_stacked").item() == pytest.approx(4 / 12, rel=1e-6)
    # images only: u0 = u2 -> 1 of 3 pairs
    assert diversity_loss(U, None, "image").item() == pytest.approx(1 / 3, rel=1e-6)


def test_stacked_diversity_ignores_matched_pairs():
    # every image equals its own caption and the pairs are orthogonal: nothing to push apart
    u = torch.eye(3)
    assert diversity_loss(u, u.clone(), "image_text_stacked").item() == pytest.approx(0.0, abs=1e-7)
    # against an explicit loop over the pairs of points that are neither identical nor matched
    torch.manual_seed(3)
    u, v = F.normalize(torch.randn(4, 5), dim=-1), F.normalize(torch.randn(4, 5), dim=-1)
    pts = torch.cat([u, v])
    terms = [pts[i] @ pts[j] for i in range(8) for j in range(8) if i != j and abs(i - j) != 4]
    assert diversity_loss(u, v, "image_text_stacked").item() == pytest.approx(sum(terms).item() / 48, rel=1e-5)
    # one pair: no terms left
    assert diversity_loss(torch.randn(1, 4), torch.randn(1, 4), "image_text_stacked").item() == 0.0


def test_diversity_range():
    torch.manual_seed(2)
    same = torch.ones(4, 3)
    assert diversity_loss(same, same).item() == pytest.approx(1.0, abs=1e-6)
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert diversity_loss(opposite, None, "image").item() == pytest.approx(-1.0, abs=1e-6)
    for mode in ("image_text", "image_text_stacked", "image"):
        d = diversity_loss(torch.randn(7, 5), torch.randn(7, 5), mode).item()
        assert -1.0 <= d <= 1.0
    with pytest.raises(ValueError):
        diversity_loss(U, V, "latent")


def test_mean_off_diagonal_and_mse_and_top1():
    m = torch.tensor([[9.0, 1.0], [3.0, 9.0]])
    assert mean_off_diagonal(m).item() == pytest.approx(2.0)
    assert noise_mse_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])).item() == pytest.approx(5.0)
    i2t, t2i = retrieval_top1(U, V)
    # row argmax of S: [0, 1 (tie 1,2 -> first), 0] -> hits 0,1 ; column argmax: [0, 1, 1] -> hits 0,1
    assert i2t.item() == pytest.approx(2 / 3)
    assert t2i.item() == pytest.approx(2 / 3)


def test_gradients_flow_to_image_features():
    u = torch.randn(4, 6, requires_grad=True)
    (contrastive_loss(u, torch.randn(4, 6)) + diversity_loss(u, torch.randn(4, 6))).backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_gathered_losses_leave_out_masked_rows():
    torch.manual_seed(4)
    u, v = torch.randn(5, 6), torch.randn(5, 6)
    keep = torch.tensor([True, False, True, True, False])
    g = GatheredEDGELosses(0.1, rank=0, world_size=1)(u, v, keep)
    assert g["contrastive"].item() == pytest.approx(contrastive_loss(u[keep], v[keep], 0.1).item(), rel=1e-6)
    assert g["diversity"].item() == pytest.approx(diversity_loss(u[keep], v[keep]).item(), rel=1e-6)
    assert g["all_image"].shape[0] == 3
    # nothing kept: the terms are 0 (not NaN) and still backpropagate
    x = torch.randn(2, 6, requires_grad=True)
    none = GatheredEDGELosses(0.1, rank=0, world_size=1)(x, torch.randn(2, 6), torch.zeros(2, dtype=torch.bool))
    (none["contrastive"] + none["diversity"]).backward()
    assert none["contrastive"].item() == 0.0 and x.grad is not None
    assert [t.item() for t in retrieval_top1(torch.zeros(0, 3), torch.zeros(0, 3))] == [0.0, 0.0]


def test_same_caption_positives_hand_value():
    # V's captions 1 and 2 are identical ([0, 1]): they are each other's matches
    pos = same_caption_positives(V)
    assert pos.tolist() == [[True, False, False], [False, True, True], [False, True, True]]
    e = math.exp(-10)
    # rows of S/0.1 = [10,0,0] {0}, [0,10,10] {1,2}, [10,0,0] {1,2}: -log(softmax mass on the positives)
    i2t = [math.log(1 + 2 * e), math.log(1 + e / 2), 10 + math.log((1 + 2 * e) / 2)]
    # columns [10,0,10] {0}, [0,10,0] {1,2}, [0,10,0] {1,2}
    t2i = [math.log(2 + e), math.log((1 + 2 * e) / (1 + e)), math.log((1 + 2 * e) / (1 + e))]
    expected = (sum(i2t) / 3 + sum(t2i) / 3) / 2
    assert contrastive_loss(U, V, 0.1, positives=pos).item() == pytest.approx(expected, rel=1e-5)
    # the diagonal as the only positives is the plain loss; the gathered variant applies the same mask
    assert contrastive_loss(U, V, 0.1, positives=torch.eye(3, dtype=torch.bool)).item() == \
        pytest.approx(contrastive_loss(U, V, 0.1).item(), rel=1e-6)
    g = GatheredEDGELosses(0.1, rank=0, world_size=1, caption_positives=True)(U, V)
    assert g["contrastive"].item() == pytest.approx(expected, rel=1e-5)
    # in-batch top-1: column 2's best image is 1, whose caption is identical to caption 2: a hit with positives
    assert [t.item() for t in retrieval_top1(U, V)] == pytest.approx([2 / 3, 2 / 3])
    assert [t.item() for t in retrieval_top1(U, V, pos)] == pytest.approx([2 / 3, 1.0])
    # distinct captions: only the diagonal
    assert same_caption_positives(torch.eye(4)).equal(torch.eye(4, dtype=torch.bool))
