"""HQQ-style quantization: rtn's layout, exact on-grid weights, never worse than RTN per block, better on
heavy-tailed weights."""

import pytest
import torch

from lowbit.algorithms.hqq import hqq
from lowbit.algorithms.rtn import rtn
from lowbit.core.errors import LowbitError, NonFiniteError
from lowbit.core.primitives import dequantize, quantize, to_blocks
from lowbit.core.spec import PerChannel, PerGroup, QuantSpec

SPECS = {
    "uint4-g64": QuantSpec("uint4", False, PerGroup(64), "float16"),
    "uint3-g64": QuantSpec("uint3", False, PerGroup(64), "float16"),
    "int4-g64": QuantSpec("int4", True, PerGroup(64), "float16"),
    "int3-g32-f32": QuantSpec("int3", True, PerGroup(32), "float32"),
    "uint4-g48-bf16": QuantSpec("uint4", False, PerGroup(48), "bfloat16"),  # 200 = 4 x 48 + 8
    "uint4-perchannel": QuantSpec("uint4", False, PerChannel(0), "float16"),
    "int4-asym": QuantSpec("int4", False, PerGroup(64), "float16"),
    "uint4-sym": QuantSpec("uint4", True, PerGroup(64), "float16"),
}


def heavy_tailed(out=96, inp=200, seed=0, df=3):
    """Student-t weights (``df`` degrees of freedom, scale 0.02): a stand-in for LLM weights with outliers."""
    g = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(df, out, inp, generator=g).square().mean(0)
    return 0.02 * torch.randn(out, inp, generator=g) / chi2.sqrt()


def block_l2(w, qt):
    d = torch.nan_to_num(to_blocks(w - qt.dequantize(), qt.spec.block_size(tuple(w.shape))), nan=0.0)
    return d.double().square().sum(-1)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_layout_matches_quantize(spec):
    w = heavy_tailed()
    ref, qt = rtn(w, spec), hqq(w, spec)
    for a, b in ((ref.codes, qt.codes), (ref.scale, qt.scale), (ref.zero_point, qt.zero_point)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(qt.codes, quantize(w, qt.scale, qt.zero_point, spec))
    assert bool((qt.scale.float() > 0).all())


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_never_worse_than_rtn_per_block(spec):
    w = heavy_tailed(seed=1)
    h, r = block_l2(w, hqq(w, spec)), block_l2(w, rtn(w, spec))
    assert bool((h <= r * (1 + 1e-9)).all())
    assert float(h.sum()) < float(r.sum())


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_on_grid_weights_exact(spec):
    """Codes spanning [qmin, qmax] in every block, power-of-two scales: hqq returns the weight itself."""
    torch.manual_seed(2)  # codes, scales and zero points below
    fmt = spec.fmt
    lo = fmt.qmin + 1 if spec.symmetric else fmt.qmin  # symmetric grids reach +-(qmax - zp) only
    ref = rtn(heavy_tailed(), spec)
    codes = torch.randint(lo, fmt.qmax + 1, ref.codes.shape)
    codes[:, 0], codes[:, -1] = lo, fmt.qmax
    if isinstance(spec.granularity, PerGroup):  # first and last element of every group
        g = spec.granularity.size
        codes[:, ::g], codes[:, g - 1 :: g] = lo, fmt.qmax
    scale = 2.0 ** torch.randint(-9, -4, ref.scale.shape).float()
    zp = ref.zero_point.float() if spec.symmetric else torch.randint(fmt.qmin + 1, fmt.qmax, ref.scale.shape)
    w = dequantize(codes.to(fmt.torch_dtype), scale.to(spec.torch_scale_dtype), zp.to(fmt.torch_dtype), spec)
    assert torch.equal(hqq(w, spec).dequantize(), w)


@pytest.mark.parametrize(
    ("spec", "limit"),
    [
        (SPECS["uint4-g64"], 0.97),  # measured 0.939
        (SPECS["uint3-g64"], 0.90),  # measured 0.853
        (SPECS["int4-g64"], 0.93),  # measured 0.885
        (SPECS["int3-g32-f32"], 0.85),  # measured 0.789
    ],
    ids=["uint4-g64", "uint3-g64", "int4-g64", "int3-g32"],
)
def test_better_than_rtn_on_heavy_tailed(spec, limit):
    w = heavy_tailed(256, 256, seed=3)
    ratio = float(block_l2(w, hqq(w, spec)).sum() / block_l2(w, rtn(w, spec)).sum())
    print(f"{spec.format} L2 ratio vs RTN: {ratio:.4f}")
    assert ratio < limit


def test_constant_and_zero_blocks_stay_exact():
    spec = SPECS["uint4-g64"]
    w = heavy_tailed(4, 128)
    w[0, :64], w[1, 64:], w[2] = 0.0, 0.375, -1.5  # exact in float16
    dq = hqq(w, spec).dequantize()
    for rows, cols in ((0, slice(0, 64)), (1, slice(64, None)), (2, slice(None))):
        assert torch.equal(dq[rows, cols], w[rows, cols])


def test_nan_weight_raises():
    w = heavy_tailed(8, 64)
    w[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="layers.0.q_proj"):
        hqq(w, SPECS["uint4-g64"], name="layers.0.q_proj")


@pytest.mark.parametrize(
    "kwargs",
    [{"iters": -1}, {"lp_norm": 0.0}, {"lp_norm": 1.5}, {"beta": 0.0}, {"kappa": 0.9}, {"refine": -1}],
    ids=["iters", "p0", "p1.5", "beta", "kappa", "refine"],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(LowbitError):
        hqq(heavy_tailed(8, 64), SPECS["uint4-g64"], **kwargs)


def test_non_integer_format_raises():
    with pytest.raises(LowbitError, match="integer format"):
        hqq(heavy_tailed(8, 64), QuantSpec("nf4", True, PerGroup(64)))
