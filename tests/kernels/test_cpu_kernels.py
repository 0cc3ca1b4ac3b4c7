"""The torch-kernel CPU backends (forced by name) agree with the reference on odd shapes and groups."""

import pytest
import torch

from lowbit import LowbitError, PerChannel, PerGroup, QLinear, QuantSpec
from lowbit.algorithms import rtn
from lowbit.kernels import select

# Relative max error vs the reference, by activation dtype: the kernels accumulate in their own order
# (float32: measured <= 1e-6) and bfloat16/float16 round activations and scales (measured <= 8e-3).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _pair(spec, rows, cols, bias=True, backend=None):
    torch.manual_seed(rows * 1000 + cols)
    w = torch.randn(rows, cols)
    fast, ref = (QLinear(cols, rows, spec, bias, backend=b) for b in (backend, "reference"))
    for m in (fast, ref):
        m.set_weight(rtn(w, spec))
    if bias:
        fast.bias = ref.bias = torch.randn(rows)
    return fast, ref


def _check(fast, ref, dtype, lead=(3, 5)):
    x = torch.randn(*lead, fast.in_features).to(dtype)
    y, y_ref = fast(x), ref(x.float())
    assert y.dtype == dtype and y.shape == (*lead, fast.out_features)
    err = float((y.float() - y_ref).abs().max() / y_ref.abs().max())
    assert err <= RTOL[dtype], err


INT8 = QuantSpec("int8", True, PerChannel(0), "float16")
INT8_SHAPES = [(64, 200), (48, 576), (17, 33), (1, 1), (128, 1536)]


@pytest.mark.parametrize("dtype", RTOL, ids=str)
@pytest.mark.parametrize("rows,cols", INT8_SHAPES, ids=[f"{r}x{c}" for r, c in INT8_SHAPES])
def test_int8_matches_reference(rows, cols, dtype):
    fast, ref = _pair(INT8, rows, cols, backend="cpu_int8pack")
    _check(fast, ref, dtype)
    _check(fast, ref, dtype, lead=(1,))


INT4 = {
    "uint4-g128-576": (QuantSpec("uint4", False, PerGroup(128), "float16"), 48, 576),
    "uint4-g64-1536": (QuantSpec("uint4", False, PerGroup(64), "float16"), 576, 1536),
    "uint4-g32-100": (QuantSpec("uint4", False, PerGroup(32)), 32, 100),
    "int4-g256-300": (QuantSpec("int4", True, PerGroup(256), "bfloat16"), 16, 300),
    "uint4-g128-64": (QuantSpec("uint4", False, PerGroup(128)), 16, 64),
}


@pytest.mark.parametrize("dtype", RTOL, ids=str)
@pytest.mark.parametrize("case", INT4.values(), ids=INT4.keys())
def test_int4_matches_reference(case, dtype):
    spec, rows, cols = case
    fast, ref = _pair(spec, rows, cols, backend="cpu_int4pack")
    _check(fast, ref, dtype)
    _check(fast, ref, dtype, lead=(1,))


@pytest.mark.parametrize(
    "spec,rows,expect",
    [
        (QuantSpec("uint4", False, PerGroup(128)), 40, "cpu_native"),
        (QuantSpec("int8", False, PerChannel(0)), 32, "cpu_native"),
        (QuantSpec("uint4", False, PerGroup(16)), 32, "reference"),
        (QuantSpec("uint3", False, PerGroup(64)), 32, "reference"),
    ],
    ids=["rows-not-16", "int8-asym", "group-16", "3-bit"],
)
def test_default_selection(spec, rows, expect):
    fast, ref = _pair(spec, rows, 256)
    assert select("weight_only_linear", fast, torch.device("cpu")).name == expect
    x = torch.randn(2, 256)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


def test_forced_backend_that_cannot_run_is_an_error():
    fast, _ = _pair(QuantSpec("uint3", False, PerGroup(64)), 32, 256)
    fast.backend = "cpu_int4pack"
    with pytest.raises(LowbitError, match="cannot run weight_only_linear"):
        fast(torch.randn(1, 256))
    fast.backend = "nope"
    with pytest.raises(LowbitError, match="unknown backend 'nope'"):
        fast(torch.randn(1, 256))


def test_prepared_layout_follows_new_weights():
    spec = INT4["uint4-g128-576"][0]
    fast, ref = _pair(spec, 48, 576, backend="cpu_int4pack")
    _check(fast, ref, torch.float32)
    w = torch.randn(48, 576)
    for m in (fast, ref):
        m.set_weight(rtn(w, spec))  # new buffers: the cached int4 repack must be rebuilt
    _check(fast, ref, torch.float32)
