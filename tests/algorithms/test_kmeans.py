"""Fitted tables (lut2..lut4) by weighted k-means: exact on data with few values, better than fixed
grids at equal code bits, importance respected, codes consistent with the stored (rounded) levels,
and the primitives and modules that cannot hold a table refuse it."""

import pytest
import torch

from lowbit.algorithms.gptq import gptq
from lowbit.algorithms.kmeans import kmeans, lloyd, nearest
from lowbit.algorithms.rtn import rtn
from lowbit.core import LowbitError, PerChannel, PerGroup, PerTensor, QuantSpec, choose_qparams
from lowbit.nn.modules import QEmbedding, QLinear

LUT3 = QuantSpec("lut3", True, PerChannel(0), "float16")


def _w(rows=32, cols=256, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_rows_with_at_most_k_values_are_exact():
    w = torch.tensor([[0.5, -1.0, 2.0, 0.5] * 8, [3.0, 3.0, -3.0, 0.0] * 8])
    qt = kmeans(w, QuantSpec("lut2", True, PerChannel(0), "float32"))
    assert torch.equal(qt.dequantize(), w)


@pytest.mark.parametrize(("bits", "grid"), [(4, "nf4"), (3, "uint3"), (2, "uint2")])
def test_beats_the_fixed_grid_of_the_same_code_bits(bits, grid):
    w = _w()
    table = kmeans(w, QuantSpec(f"lut{bits}", True, PerChannel(0)))
    fixed = rtn(w, QuantSpec(grid, grid == "nf4", PerChannel(0)))
    err = lambda q: float((q.dequantize() - w).norm() / w.norm())  # noqa: E731
    assert err(table) < 0.92 * err(fixed)


def test_codes_point_at_the_nearest_stored_level():
    w = _w()
    qt = kmeans(w, LUT3)
    assert qt.levels.dtype == torch.float16 and qt.levels.shape == (32, 8) and qt.scale.shape == (32, 1)
    lv = qt.levels.float()
    assert bool((lv[:, 1:] >= lv[:, :-1]).all()) and float(lv.abs().max()) == 1.0
    v = w / qt.scale.float()
    assert torch.equal(qt.codes.long(), nearest(v, lv))
    best = (v[:, :, None] - lv[:, None, :]).abs().min(-1).values
    assert torch.allclose((v - lv.gather(1, qt.codes.long())).abs(), best)


def test_importance_pulls_levels_to_the_weighted_values():
    w = _w(8, 512)
    imp = torch.ones_like(w)
    imp[:, :16] = 1000.0  # 16 heavy values per row, 8 levels: each heavy value nearly exact
    plain, weighted = kmeans(w, LUT3), kmeans(w, LUT3, importance=imp)
    err = lambda q: float((q.dequantize() - w)[:, :16].abs().mean())  # noqa: E731
    assert err(weighted) < 0.5 * err(plain)


def test_one_table_per_tensor():
    qt = kmeans(_w(), QuantSpec("lut4", True, PerTensor()))
    assert qt.levels.shape == (1, 16) and qt.scale.shape == (1, 1)
    assert float((qt.dequantize() - _w()).norm() / _w().norm()) < 0.12


def test_lloyd_keeps_the_better_start_per_row():
    w = _w(16, 256)
    c = lloyd(w, torch.ones_like(w), 16, iters=25)
    nf4 = rtn(w, QuantSpec("nf4", True, PerChannel(0))).dequantize()
    mine = c.gather(1, nearest(w, c))
    assert bool(((mine - w).square().sum(1) <= (nf4 - w).square().sum(1) + 1e-6).all())


def test_gptq_with_tables_beats_plain_kmeans_on_the_layer_output():
    g = torch.Generator().manual_seed(0)
    w, x = (
        torch.randn(64, 128, generator=g),
        torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g),
    )
    h = 2 * x.t() @ x / 512
    err = lambda q: float((x @ (q.dequantize() - w).t()).square().mean())  # noqa: E731
    assert err(gptq(w, h, LUT3)) < 0.8 * err(kmeans(w, LUT3))


def test_refusals_name_the_problem():
    with pytest.raises(LowbitError, match="one table per output channel"):
        QuantSpec("lut3", True, PerGroup(64))
    with pytest.raises(LowbitError, match="format lut3 has a fitted table per tensor"):
        choose_qparams(_w(), LUT3)
    with pytest.raises(LowbitError, match="kmeans fits table formats"):
        kmeans(_w(), QuantSpec("int4", True, PerChannel(0)))
    with pytest.raises(LowbitError, match="importance must be finite and non-negative"):
        kmeans(_w(), LUT3, importance=-torch.ones(256))
    with pytest.raises(LowbitError, match="QEmbedding takes int, codebook and float formats"):
        QEmbedding(10, 8, LUT3)


def test_qlinear_stores_the_table_and_refuses_a_bad_one():
    lin = torch.nn.Linear(256, 32)
    q = QLinear.from_float(lin, LUT3)
    q.set_weight(kmeans(lin.weight.detach(), LUT3))
    assert q.levels.shape == (32, 8) and q.state_problem() is None
    x = torch.randn(3, 256)
    assert torch.allclose(q(x), x @ q.dequantized_weight().t() + q.bias, atol=1e-5)
    q.levels[0, 0] = 2.0
    assert "levels hold values outside [-1, 1]" in q.state_problem()
