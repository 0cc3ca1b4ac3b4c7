"""``cpu_native_a8`` (int8 activations per block of 32, integer dot products) against a float64 torch
reference of its rule: every code, scale and zero-point kind, odd shapes and groups, in the AVX-512
build, in it without AVX512-BF16/VBMI/GFNI (``nobf16``) and in the portable C build."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lowbit import LowbitError, PerChannel, PerGroup, QLinear, QuantSpec
from lowbit.algorithms import rtn
from lowbit.core.codec import decode
from lowbit.kernels import cpu_native, native, select

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: native kernels not built")
# the backend itself (module forwards, selection) needs the AVX512-VNNI build; the kernels run anywhere
needs_vnni = pytest.mark.skipif(
    not native.available() or native.library().lb_has_vnni() != 1, reason="no AVX512-VNNI on this CPU"
)

# Relative max error vs the float64 reference of the a8 rule: the kernels' integer sums are exact, their
# float sums (d_b s_g products, zero-point term) run in float32 in their own order (measured <= 1e-6).
RTOL = 1e-5
# The a8 result vs the exact product on Gaussian data, max error over max |y| (measured <= 7e-3, relative
# RMS ~5e-3: int8 rounding of activations per block of 32 costs up to 0.4% of each block's largest value).
RTOL_EXACT = 2e-2

CPU = torch.device("cpu")
FORMATS = {"int8": True, "uint8": False, "int4": True, "uint4": False}  # format -> symmetric
SCALES = ["float32", "float16", "bfloat16"]
# granularity -> how the kernel takes it: one group, units inside one group, groups varying across lanes
GRANULARITIES = {
    "channel": PerChannel(0),
    "g32": PerGroup(32),
    "g64": PerGroup(64),
    "g96": PerGroup(96),
    "g128": PerGroup(128),
    "g256": PerGroup(256),
}
# (rows, cols): K a multiple of 64 with a partial last group, K not a multiple of 32, odd K (half a byte),
# K < 32, K = 1; rows not a multiple of 4 (the kernel takes four weight rows at a time for one row).
SHAPES = [(48, 576), (33, 100), (7, 31), (5, 1001), (6, 1), (4, 160)]
# 1: four weight rows at a time; 3: 2 + 1 activation rows at a time; 4: four activation rows at a time;
# 7: the many-row path (weight tiles unpacked once, then every row; from 5 rows in the AVX512-VNNI build)
BATCHES = [1, 3, 4, 7]


VARIANTS = ["native", "nobf16", "generic"]  # -march=native; without AVX512-BF16/VBMI/GFNI; portable C


@pytest.fixture
def run_all(monkeypatch):
    """``run_all(fn)``: ``fn()`` once on each build of the kernels this machine has (one reference serves
    them all)."""

    def run(fn):
        for name in VARIANTS:
            lib = native.library(name)
            if lib is None:  # e.g. the x86 variants elsewhere
                continue
            monkeypatch.setattr(native, "library", lambda variant="native", lib=lib: lib)
            fn()
        monkeypatch.undo()

    return run


def a8_reference(x: torch.Tensor, layer) -> torch.Tensor:
    """float64 ``(M, N)`` by the a8 rule (``csrc/lowbit_cpu_a8.c``): ``x`` cut into blocks of 32 along K
    (zero-padded), ``d = max|x| / 127`` (0 below the smallest normal float) and codes
    ``clamp(round(x * (1 / d)), -127, 127)`` per block in float32; then ``sum_g s_g sum_b d_b sum_k
    (c_k - zp_g) q_k`` exactly, plus the bias."""
    k, n, m = layer.cols, layer.rows, x.shape[0]
    nb = -(-k // 32)
    xb = F.pad(x.float(), (0, nb * 32 - k)).reshape(m, nb, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    d = torch.where(d >= torch.finfo(torch.float32).tiny, d, 0.0)
    q = torch.where(d > 0, (xb * (1 / d)).clamp(-127, 127).round(), 0.0)
    group = cpu_native._group(layer)
    codes = decode(layer.qweight, layer.spec.fmt, k).long()
    zp = layer.zero_point.long()[:, torch.arange(k) // group] if layer.zero_point is not None else 0
    cz = F.pad((codes - zp).double(), (0, nb * 32 - k)).reshape(n, nb, 32)
    dots = torch.einsum("mbk,nbk->mnb", q.double(), cz)  # exact: integers below 2^53
    s = layer.scale.double()[:, torch.arange(nb) * 32 // group]
    y = (dots * d.squeeze(-1).double()[:, None, :] * s[None]).sum(-1)
    return y + layer.bias.double() if layer.bias is not None else y


def _layer(spec, rows, cols, bias=True, zero_point=True):
    torch.manual_seed(rows * 7919 + cols)
    layer = QLinear(cols, rows, spec, bias, backend="cpu_native_a8")
    w = torch.randn(rows, cols)
    w[0, : min(cols, 8)] = 0.0  # a constant stretch
    layer.set_weight(rtn(w, spec))
    if bias:
        layer.bias = torch.randn(rows)
    if not zero_point:
        layer.zero_point = None  # symmetric codes: the zero points are 0 anyway
    return layer


def _x(batch, cols):
    torch.manual_seed(batch * 31 + cols)
    x = torch.randn(batch, cols)
    x[0, :40] = 0.0  # an all-zero block (scale 0)
    if batch > 1:
        x[1] = 0.0  # an all-zero row
    return x


def _err(y, want) -> float:
    return float((y.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _check(run_all, layer, batches=BATCHES):
    cases = [(x, a8_reference(x, layer)) for x in (_x(b, layer.cols) for b in batches)]

    def check():
        for x, want in cases:
            assert _err(cpu_native.weight_only_linear_a8(x, layer), want) <= RTOL

    run_all(check)


KINDS = [(f, s, zp) for f in FORMATS for s in SCALES for zp in (True, False) if zp or FORMATS[f]]


@pytest.mark.parametrize("fmt,scale,zp", KINDS, ids=[f"{f}-{s}-{'zp' if z else 'nozp'}" for f, s, z in KINDS])
def test_every_code_scale_and_zero_point_kind(run_all, fmt, scale, zp):
    for gran in (PerChannel(0), PerGroup(64)):
        _check(run_all, _layer(QuantSpec(fmt, FORMATS[fmt], gran, scale), 37, 200, bias=zp, zero_point=zp))


@pytest.mark.parametrize("gran", GRANULARITIES.values(), ids=GRANULARITIES.keys())
@pytest.mark.parametrize("fmt", ["int8", "uint4"])
@pytest.mark.parametrize("rows,cols", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
def test_shapes_and_groups(run_all, fmt, gran, rows, cols):
    _check(run_all, _layer(QuantSpec(fmt, FORMATS[fmt], gran, "float16"), rows, cols, bias=rows % 2 == 0))


def test_large_buffers_and_odd_thread_counts(run_all, monkeypatch):
    """16 rows of K = 4100: the activation buffers leave the stack for the heap; 3 workers split N."""
    monkeypatch.setattr(native, "threads", lambda: 3)
    _check(run_all, _layer(QuantSpec("uint4", False, PerGroup(128), "float16"), 29, 4100), batches=[16, 1])


@pytest.mark.parametrize("batch", [3, 16])  # the one-row and the many-row paths
def test_zero_and_subnormal_rows_give_zeros(run_all, batch):
    """Blocks whose scale max|x| / 127 is 0 or subnormal count as zeros."""
    layer = _layer(QuantSpec("uint4", False, PerGroup(64), "float16"), 9, 100, bias=False)
    x = torch.zeros(batch, 100)
    x[1::3] = 1e-39
    x[2::3, ::3] = -1e-36  # max|x| / 127 below the smallest normal float

    def check():
        assert torch.equal(cpu_native.gemv_a8(x, layer), torch.zeros(batch, 9))  # the other rule gives ~1e-35

    run_all(check)


@pytest.mark.parametrize("batch", [3, 16])
def test_nan_and_infinity_give_nan(run_all, batch):
    layer = _layer(QuantSpec("int4", True, PerGroup(64), "float16"), 9, 100)
    x = torch.randn(batch, 100)
    x[0, 70], x[1, 3] = float("nan"), float("inf")

    def check():
        y = cpu_native.gemv_a8(x, layer)
        assert y[:2].isnan().all() and y[2:].isfinite().all()

    run_all(check)


# The many-row path (from 5 rows with AVX512-VNNI) vs the same rows one at a time: the same int8 codes,
# block scales and exact block sums, float sums in another order (measured <= 1.3e-6 of each row's max).
RTOL_ROWS = 1e-5
MANY = [16, 17, 64, 130]
# (format, symmetric, granularity, rows, cols, bias): N past a whole tile of 32 and short of one, K not a
# multiple of 32 (odd for 4-bit: half a byte), a partial last group, K < 32, asymmetric zero points, groups
# of more than the 8 blocks the kernel sums before scaling.
MANY_CASES = [
    ("uint4", False, PerGroup(128), 70, 576, True),
    ("int4", True, PerGroup(32), 33, 1001, False),
    ("uint4", True, PerChannel(0), 7, 31, True),
    ("int8", True, PerChannel(0), 96, 1000, True),
    ("int8", False, PerGroup(64), 37, 160, False),
    ("uint8", False, PerGroup(96), 45, 300, True),
    ("uint4", False, PerGroup(512), 64, 4100, True),
]


def _row_err(y, want) -> float:
    """Largest error of a row over that row's largest |want|."""
    y, want = y.double(), want.double()
    return float(((y - want).abs().amax(1) / want.abs().amax(1).clamp_min(1e-30)).max())


@needs_vnni
@pytest.mark.parametrize(
    "fmt,sym,gran,rows,cols,bias",
    MANY_CASES,
    ids=[f"{c[0]}-{'s' if c[1] else 'a'}-{c[3]}x{c[4]}" for c in MANY_CASES],
)
def test_many_rows_match_rows_one_at_a_time(run_all, fmt, sym, gran, rows, cols, bias):
    layer = _layer(QuantSpec(fmt, sym, gran, "float16"), rows, cols, bias=bias)
    xs = [_x(m, cols) for m in MANY]
    for x in xs:
        x[2] *= 1e3  # rows of different magnitudes
    refs = [a8_reference(x, layer) for x in xs]

    def check():
        for x, want in zip(xs, refs, strict=True):
            y = cpu_native.gemv_a8(x, layer)
            one = torch.cat([cpu_native.gemv_a8(x[m : m + 1], layer) for m in range(x.shape[0])])
            assert _row_err(y, one) <= RTOL_ROWS
            assert _row_err(y, want) <= RTOL
            assert _row_err(one, want) <= RTOL

    run_all(check)


@needs_vnni
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_rows_any_thread_count(monkeypatch, threads):
    """One weight tile (activation rows split into chunks between workers) and many; every thread count."""
    monkeypatch.setattr(native, "threads", lambda: threads)
    for rows in (20, 400):
        layer = _layer(QuantSpec("uint4", False, PerGroup(64), "bfloat16"), rows, 256)
        x = _x(130, 256)
        one = torch.cat([cpu_native.gemv_a8(x[m : m + 1], layer) for m in range(130)])
        assert _row_err(cpu_native.gemv_a8(x, layer), one) <= RTOL_ROWS


@needs_vnni
@pytest.mark.parametrize("fmt", ["int8", "uint4"])
def test_close_to_the_exact_product(fmt):
    layer = _layer(QuantSpec(fmt, FORMATS[fmt], PerGroup(128), "float16"), 64, 576)
    x = torch.randn(4, 576)
    exact = x.double() @ layer.dequantized_weight().double().T + layer.bias.double()
    assert _err(layer(x), exact) <= RTOL_EXACT


@needs_vnni
def test_real_size_layer_through_the_module():
    """SmolLM2's 576x576 projection, uint4 g128 (fp16 scales, uint8 zero points), forced by ``backend``."""
    layer = _layer(QuantSpec("uint4", False, PerGroup(128), "float16"), 576, 576)
    assert select("weight_only_linear", layer, CPU).name == "cpu_native"  # default unchanged
    assert select("weight_only_linear", layer, CPU, prefer="cpu_native_a8").name == "cpu_native_a8"
    x = torch.randn(1, 1, 576)
    assert _err(layer(x).reshape(1, 576), a8_reference(x.reshape(1, 576), layer)) <= RTOL
    x16 = torch.randn(16, 576).to(torch.bfloat16)
    y16 = layer(x16)
    assert y16.dtype == torch.bfloat16
    assert _err(y16, a8_reference(x16.float(), layer)) <= 1e-2  # bf16 output rounding


@needs_vnni
def test_more_rows_than_gemv_take_the_exact_path():
    layer = _layer(QuantSpec("uint4", False, PerGroup(128), "float16"), 48, 576)
    x = torch.randn(17, 576)
    exact = cpu_native.weight_only_linear(x, layer)
    assert torch.equal(layer(x), exact)
    layer.native_gemv_rows = 0  # every call exact
    assert torch.equal(layer(x[:1]), cpu_native.weight_only_linear(x[:1], layer))


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("nf4", True, PerGroup(64), "float16"),  # a codebook: float levels, not integer codes
        QuantSpec("uint4", False, PerGroup(48), "float16"),  # a group not a multiple of 32
    ],
    ids=["nf4", "g48"],
)
def test_what_it_does_not_take(spec):
    layer = _layer(spec, 16, 96)
    with pytest.raises(LowbitError):
        select("weight_only_linear", layer, CPU, prefer="cpu_native_a8")


def test_vnni_follows_the_cpu():
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    expect = int("avx512_vnni" in flags and "avx512bw" in flags and native.library().lb_has_avx512() == 1)
    assert native.library().lb_has_vnni() == expect
    generic = native.library("generic")
    assert generic is None or generic.lb_has_vnni() == 0
