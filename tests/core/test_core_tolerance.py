"""Tolerance: relative RMS round-trip error on Gaussian weights stays within a per-format table.

The table holds the measured error (64 x 256 randn, PerGroup(64), seed 0) rounded up by ~20%; a wrong
scale, zero point or level choice shows up here even when every invariant still holds.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.core import FORMATS, PerGroup, QuantSpec, choose_qparams, dequantize, quantize

# format -> (symmetric, asymmetric) max relative RMS error; measured values in the comments
REL_RMSE = {
    "int8": (0.0072, 0.0065),  # 0.00595, 0.00538
    "int7": (0.0146, 0.0129),  # 0.01209, 0.01068
    "int6": (0.0292, 0.0260),  # 0.02432, 0.02159
    "int5": (0.0606, 0.0527),  # 0.05044, 0.04389
    "int4": (0.130, 0.109),  # 0.1078, 0.09053
    "int3": (0.302, 0.234),  # 0.25147, 0.19418
    "int2": (0.864, 0.549),  # 0.71937, 0.45688
    "uint8": (0.0072, 0.0065),  # same grids as the signed formats, shifted
    "uint4": (0.130, 0.109),
    "uint2": (0.864, 0.549),
    "uint1": (None, 1.0),  # 0.9757: {0, hi} or {lo, 0}; no symmetric form
    "ternary": (0.864, 0.794),  # 0.71937, 0.66149
    "binary": (0.72, None),  # 0.59917
    "nf4": (0.111, None),  # 0.09246
    "log2": (0.227, None),  # 0.18874
    "fp4_e2m1": (0.128, None),  # 0.10595
    "fp16": (0.00026, None),  # 0.00021
    "bf16": (0.0021, None),  # 0.00167
    "fp8_e4m3": (0.031, None),  # 0.0252
    "fp8_e5m2": (0.060, None),  # 0.04986
}
CASES = [(name, sym) for name, (s, a) in REL_RMSE.items() for sym, tol in ((True, s), (False, a)) if tol]
CASE_IDS = [f"{name}-{'sym' if sym else 'asym'}" for name, sym in CASES]


def _rel_rmse(x: torch.Tensor, spec: QuantSpec) -> float:
    scale, zp = choose_qparams(x, spec)
    out = dequantize(quantize(x, scale, zp, spec), scale, zp, spec)
    return float((x - out).norm() / x.norm())


@pytest.mark.parametrize(("name", "symmetric"), CASES, ids=CASE_IDS)
def test_round_trip_error_within_table(name, symmetric):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(name, symmetric=symmetric, granularity=PerGroup(64))
    tol = REL_RMSE[name][0 if symmetric else 1]
    assert _rel_rmse(x, spec) <= tol


def test_table_covers_every_format_family():
    assert {n for n in FORMATS if not n.startswith(("int", "uint"))} <= set(REL_RMSE)


@pytest.mark.parametrize("bits", range(3, 9), ids=lambda b: f"int{b}")
def test_one_more_bit_halves_the_error(bits):
    """Uniform grids: each extra bit about halves the error. Measured ratios int2/int3 .. int7/int8:
    2.85 (symmetric int2 has only 3 levels), 2.33, 2.15, 2.06, 2.03, 2.01."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    lo = _rel_rmse(x, QuantSpec(f"int{bits - 1}", granularity=PerGroup(64)))
    hi = _rel_rmse(x, QuantSpec(f"int{bits}", granularity=PerGroup(64)))
    assert 1.9 <= lo / hi <= (3.0 if bits == 3 else 2.5)
