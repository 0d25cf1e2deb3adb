"""--scorer_shift: each image moved by a seeded offset within the bound, edges repeated, gradients kept."""
import torch

from utils.method.scorer_shift import random_shift


def test_a_dot_moves_by_at_most_the_bound_and_keeps_its_gradient():
    img = torch.zeros(8, 1, 16, 16)
    img[:, :, 8, 8] = 1.0
    img.requires_grad_(True)
    out = random_shift(img, 0.125, torch.Generator().manual_seed(0))  # 2 px at 16 px
    assert out.shape == img.shape
    moves = set()
    for k in range(8):
        (y, x), = (out[k, 0] == 1.0).nonzero().tolist()
        assert abs(y - 8) <= 2 and abs(x - 8) <= 2 and out[k].sum() == 1.0
        moves.add((y - 8, x - 8))
    assert len(moves) > 1  # each image its own offset
    out.sum().backward()
    assert torch.equal(img.grad[:, 0, 8, 8], torch.ones(8))  # the dot lands once in each shifted image


def test_edges_are_repeated_seeded_and_zero_is_identity():
    img = torch.arange(16.0).view(1, 1, 4, 4).repeat(3, 1, 1, 1)
    assert random_shift(img, 0.0, torch.Generator()) is img
    a = random_shift(img, 0.25, torch.Generator().manual_seed(5))
    b = random_shift(img, 0.25, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) <= set(range(16))  # replicate padding: only values of the image itself
