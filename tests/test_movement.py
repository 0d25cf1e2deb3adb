"""The no-op guard's two numbers, against hand-computed values."""
import numpy as np
import pytest
import torch

from utils.method.movement import mean_abs_pixel_change, relative_change, snapshot


def test_relative_change_by_hand():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([[0.0, 4.0]])
    start = snapshot([a, b])  # ||theta_0|| = 5
    a.data += torch.tensor([0.0, 3.0])
    b.data += torch.tensor([[4.0, 0.0]])  # ||theta - theta_0|| = 5
    assert relative_change([a, b], start) == pytest.approx(1.0)
    assert relative_change([a, b], snapshot([a, b])) == 0.0
    assert relative_change([torch.zeros(2)], [torch.zeros(2)]) == 0.0


def test_mean_abs_pixel_change_by_hand():
    x = np.zeros((2, 2, 3), dtype=np.uint8)
    y = x.copy()
    y[0, 0] = (255, 0, 0)  # one channel of one pixel: 255 / 12 values
    assert mean_abs_pixel_change(y, x) == pytest.approx(21.25)
    with pytest.raises(ValueError, match="differ in size"):
        mean_abs_pixel_change(np.zeros((2, 2, 3)), np.zeros((3, 3, 3)))
