"""LLM.int8 outlier selection and the exact column split."""

import pytest
import torch

from lowbit.algorithms.outliers import outlier_channels, rest_channels, split_columns
from lowbit.core import LowbitError, NonFiniteError


def test_channels_over_threshold_sorted():
    a = torch.tensor([0.5, 7.0, 6.0, 100.0, 3.0, 6.5])
    idx = outlier_channels(a, threshold=6.0, max_fraction=1.0)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [1, 3, 5]  # 6.0 itself is not above the threshold


def test_cap_keeps_the_largest():
    a = torch.ones(1000)
    a[[10, 500, 20, 900, 3]] = torch.tensor([8.0, 50.0, 7.0, 9.0, 30.0])
    # 1% of 1000 -> 10 allowed, all 5 kept
    assert outlier_channels(a).tolist() == [3, 10, 20, 500, 900]
    # 0.3% -> 3 allowed: 50, 30 and 9 are the largest, returned in channel order
    assert outlier_channels(a, max_fraction=0.003).tolist() == [3, 500, 900]
    assert outlier_channels(a, max_fraction=0.0).numel() == 0
    assert outlier_channels(torch.ones(10)).numel() == 0


def test_selection_checks_inputs():
    with pytest.raises(LowbitError, match=r"1-d \(in,\), got shape \(2, 3\)"):
        outlier_channels(torch.ones(2, 3))
    with pytest.raises(LowbitError, match="max_fraction"):
        outlier_channels(torch.ones(3), max_fraction=1.5)
    with pytest.raises(LowbitError, match="threshold"):
        outlier_channels(torch.ones(3), threshold=float("nan"))
    with pytest.raises(NonFiniteError, match="act_absmax"):
        outlier_channels(torch.tensor([1.0, float("inf")]))


def test_split_is_exact():
    torch.manual_seed(0)
    w, x = torch.randn(6, 10), torch.randn(4, 10)
    idx = torch.tensor([7, 2])
    w_out, w_rest, rest = split_columns(w, idx)
    assert w_out.shape == (6, 2) and w_rest.shape == (6, 8)
    assert rest.tolist() == [0, 1, 3, 4, 5, 6, 8, 9]
    torch.testing.assert_close(x[:, rest] @ w_rest.T + x[:, idx] @ w_out.T, x @ w.T)
    _, w_all, rest_all = split_columns(w, torch.tensor([], dtype=torch.int64))
    assert torch.equal(w_all, w) and rest_all.tolist() == list(range(10))


def test_split_checks_indices():
    with pytest.raises(LowbitError, match=r"\[0, 5\)"):
        rest_channels(5, torch.tensor([5]))
    with pytest.raises(LowbitError, match="unique"):
        rest_channels(5, torch.tensor([1, 1]))
    with pytest.raises(LowbitError, match=r"2-d \(out, in\)"):
        split_columns(torch.ones(3), torch.tensor([0]))
