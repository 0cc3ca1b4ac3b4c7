"""The machinery under the observers: ``qparams_from_range``, the growing histogram, subsampled counting
and the clipping-search costs (exact where exact, against brute force where approximate)."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.core import (
    LowbitError,
    NonFiniteError,
    PerChannel,
    QuantSpec,
    choose_qparams,
    dequantize,
    qparams_from_range,
    quantize,
)
from lowbit.observers import make_observer
from lowbit.observers.histogram import RUN, SAMPLES, Histogram, _stride
from lowbit.observers.mse import int_mse
from lowbit.observers.search import Bins, clipped


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- qparams_from_range


@pytest.mark.parametrize(
    "fmt", ["int8", "uint8", "int4", "uint1", "ternary", "nf4", "log2", "fp8_e4m3", "fp16"]
)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_qparams_from_range_is_choose_qparams_of_the_range(fmt, sym):
    if not sym and fmt in ("nf4", "log2", "fp8_e4m3", "fp16"):
        pytest.skip("symmetric-only format")
    if sym and fmt == "uint1":
        pytest.skip("uint1 has no symmetric form")
    lo = torch.cat([-_randn(20).abs() * 3, torch.tensor([0.0, 2.5, -1.0, 0.0, 1e-30])])
    hi = torch.cat([_randn(20, seed=1).abs() * 3, torch.tensor([0.0, 2.5, -1.0, 4.0, 1e-30])])
    spec = QuantSpec(fmt, symmetric=sym, granularity=PerChannel(0), scale_dtype="bfloat16")
    want = choose_qparams(torch.stack([lo, hi], 1), spec)
    got = qparams_from_range(lo, hi, spec)
    assert torch.equal(got[0], want[0][:, 0])
    assert (got[1] is None) == (want[1] is None)
    assert got[1] is None or torch.equal(got[1], want[1][:, 0])


def test_qparams_from_range_rejects_bad_ranges():
    spec = QuantSpec()
    with pytest.raises(LowbitError, match=r"lo shape \(3,\) != hi shape \(2,\)"):
        qparams_from_range(torch.zeros(3), torch.zeros(2), spec)
    with pytest.raises(LowbitError, match="lo > hi in 1 of 2 ranges"):
        qparams_from_range(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.5]), spec)
    with pytest.raises(NonFiniteError):
        qparams_from_range(torch.tensor([float("nan")]), torch.tensor([1.0]), spec)
    with pytest.raises(LowbitError, match="binary scales by the mean"):
        qparams_from_range(torch.zeros(2), torch.ones(2), QuantSpec("binary"))
    scale, zp = qparams_from_range(torch.zeros(2), torch.ones(2), QuantSpec("binary"), mean_abs=torch.ones(2))
    assert zp is None and torch.equal(scale, torch.ones(2))


# ---------------------------------------------------------------- histogram


def _direct(hist: Histogram, values: torch.Tensor) -> torch.Tensor:
    """Counts of ``values`` (one channel) in ``hist``'s current bins, computed from scratch."""
    idx = torch.floor((values.double() - hist.start[0]) / hist.width[0]).clamp(0, hist.bins - 1).long()
    return torch.bincount(idx, minlength=hist.bins).double()


@pytest.mark.parametrize("first", ["wide", "narrow", "constant"])
def test_growth_rebins_exactly(first):
    """Old bins nest in new ones: after growing, counts equal those of all data binned at once."""
    batches = {
        "wide": [_randn(5000) * 3, _randn(3000, seed=1) * 8 + 5, _randn(4000, seed=2) * 30 - 40],
        "narrow": [_randn(5000) * 1e-3, _randn(3000, seed=1), _randn(4000, seed=2) * 100],
        "constant": [torch.zeros(5000), torch.zeros(10), _randn(4000, seed=2).relu(), _randn(100) * 7],
    }[first]
    hist = Histogram(1, 2048)
    for b in batches:
        x3 = b.reshape(1, 1, -1)
        hist.add(x3, b.min().reshape(1), b.max().reshape(1))
    every = torch.cat(batches)
    assert float(hist.counts.sum()) == every.numel()
    mismatched = float((hist.counts[0] - _direct(hist, every)).abs().sum())
    assert mismatched <= 4  # a value on a bin edge counts in a neighbour (rounding); measured 0, 2, 0
    assert float(hist.start[0]) <= float(every.min()) and float(
        hist.start[0] + 2048 * hist.width[0]
    ) >= float(every.max())


def test_point_mass_lands_in_its_bin():
    hist = Histogram(1, 16)
    zeros = torch.zeros(100)
    hist.add(zeros.reshape(1, 1, -1), torch.zeros(1), torch.zeros(1))
    assert float(hist.width[0]) == 0 and float(hist.counts[0, 0]) == 100
    x = torch.linspace(-1, 3, 17)
    hist.add(x.reshape(1, 1, -1), x.min().reshape(1), x.max().reshape(1))
    assert float(hist.counts[0, 4]) == 101  # bin 4 of 16 over [-1, 3] holds 0 (and the value 0 itself)


@pytest.mark.parametrize("shape", [(32, 96, 112, 112), (7, 4096, 576), (SAMPLES + 1,), (2, 3)])
def test_stride_is_coprime_with_every_dimension(shape):
    s = _stride(shape)
    n = math.prod(shape)
    assert s == 1 if n <= SAMPLES else (math.ceil(n / s) <= SAMPLES and s > 1)
    assert all(math.gcd(s, d) == 1 for d in shape if d > 1)


def test_subsampled_per_channel_counts_land_in_their_channel():
    """786k values > SAMPLES: every s-th is counted with weight s, extremes with weight 1."""
    x = _randn(64, 3, 64, 64) + torch.tensor([0.0, 10.0, -20.0])[None, :, None, None]
    obs = make_observer("percentile", QuantSpec(granularity=PerChannel(1)), percentile=50.0)
    obs.update(x)
    lo, hi = obs.range()
    torch.testing.assert_close(hi, x.transpose(0, 1).reshape(3, -1).median(1).values, atol=0.02, rtol=0)
    total = obs.hist.counts.sum(1)
    assert bool(((total - x[:, 0].numel()).abs() <= RUN * _stride(tuple(x.shape)) + 2).all())


# ---------------------------------------------------------------- search costs


@pytest.mark.parametrize(("fmt", "sym"), [("int8", True), ("int4", False), ("uint2", False), ("int3", True)])
def test_int_mse_is_the_expected_error(fmt, sym):
    """Closed-form expected error of the histogram vs. brute-force fake quantization of the samples."""
    spec = QuantSpec(fmt, symmetric=sym)
    x = _randn(50_000) * 2 + 0.5
    obs = make_observer("mse", spec)
    obs.update(x)
    ratios = torch.pow(2.0, -torch.arange(0, 64, 8, dtype=torch.float64) / 16)[:, None]
    cand_lo, cand_hi = clipped(ratios, obs.lo[None]), clipped(ratios, obs.hi[None])
    predicted = int_mse(Bins.of(obs.hist), cand_lo, cand_hi, spec)[:, 0] / x.numel()
    actual = []
    for lo, hi in zip(cand_lo, cand_hi, strict=True):
        scale, zp = qparams_from_range(lo, hi, spec)
        actual.append(float(((dequantize(quantize(x, scale, zp, spec), scale, zp, spec) - x) ** 2).mean()))
    actual = torch.tensor(actual, dtype=torch.float64)
    assert float(((predicted - actual).abs() / actual).max()) < 2e-3  # measured 1.3e-3 (int8) .. 6e-5 (uint2)


def test_kl_on_gaussian_matches_tensorrt():
    """int8 symmetric on N(0, 1): TensorRT-style entropy calibration (MXNet's ``_get_optimal_threshold``:
    2001 bins, 255 quantized bins), run offline on this very data, picks T = 4.644; lowbit picks 4.658."""
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(0))
    obs = make_observer("kl", QuantSpec("int8"))
    obs.update(x)
    lo, hi = obs.range()
    assert abs(max(-float(lo), float(hi)) / 4.644 - 1) < 0.03


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "nf4", "log2"])
def test_mse_on_float_and_codebook_formats(fmt):
    """Bin centers under the real quantize/dequantize: never worse than minmax on the data it saw.
    Measured quantization MSE (mse / minmax): fp8_e4m3 7.0e-4 / 7.0e-4, nf4 0.094 / 0.511."""
    x = _randn(64, 2048)
    x.view(-1)[:16] = 30.0
    spec = QuantSpec(fmt)
    errors = []
    for kind in ("mse", "minmax"):
        obs = make_observer(kind, spec)
        obs.update(x)
        scale = obs.qparams()[0].reshape(1, 1)
        errors.append(
            float(((dequantize(quantize(x, scale, None, spec), scale, None, spec) - x) ** 2).mean())
        )
    assert errors[0] <= errors[1] * (1 + 1e-6)
    if fmt == "nf4":
        assert errors[0] < 0.25 * errors[1]
