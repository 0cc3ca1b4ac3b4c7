"""lowbit's own CPU kernels agree with the reference backend: every format, granularity, scale dtype and
batch path (fused GEMV and tiled sgemm), in the AVX-512 build and the portable C build."""

import warnings

import pytest
import torch

from lowbit import Int8Dynamic, PerChannel, PerGroup, QDynamicLinear, QLinear, QuantSpec, quantize_
from lowbit.algorithms import rtn
from lowbit.kernels import cpu_native, native, select

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: native kernels not built")

# Relative max error vs the reference: both accumulate in float32, in different orders (measured
# <= 3e-6);
# bfloat16 activations are rounded on the way out (measured <= 4e-3).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

SPECS = {
    "int8-channel": QuantSpec("int8", True, PerChannel(0), "float16"),
    "uint8-channel-asym": QuantSpec("uint8", False, PerChannel(0), "float32"),
    "int8-g64": QuantSpec("int8", True, PerGroup(64), "bfloat16"),
    "uint4-g128": QuantSpec("uint4", False, PerGroup(128), "float16"),
    "uint4-g32": QuantSpec("uint4", False, PerGroup(32), "float32"),
    "int4-g64-sym": QuantSpec("int4", True, PerGroup(64), "float16"),
    "uint4-channel": QuantSpec("uint4", False, PerChannel(0), "float16"),
    "uint4-g256-wide": QuantSpec("uint4", False, PerGroup(256), "float16"),
    "uint4-g96": QuantSpec("uint4", False, PerGroup(96), "float16"),  # not 32, 64 or 128k: scales by quarter
    "int4-g32-bf16scale": QuantSpec("int4", False, PerGroup(32), "bfloat16"),
    # 4-bit codebooks: indices looked up in the format's level table
    "nf4-g64": QuantSpec("nf4", True, PerGroup(64), "float16"),
    "fp4-g32": QuantSpec("fp4_e2m1", True, PerGroup(32), "float32"),
    "log2-channel": QuantSpec("log2", True, PerChannel(0), "bfloat16"),
    "lut4-channel": QuantSpec("lut4", True, PerChannel(0), "float16"),  # a fitted table per row
}
# (rows, cols): K that no group divides, K < 32, odd K (a half-filled last byte), K = 1.
SHAPES = [(48, 576), (33, 100), (16, 31), (5, 1), (24, 1001)]
BATCHES = [1, 2, 3, 4, 16, 17, 70]  # <= GEMV_ROWS: GEMV (4-bit: 1-4 rows a pass); above: tiled


@pytest.fixture(params=["native", "nobf16", "generic"])
def variant(request, monkeypatch):
    """Run each test on the -march=native build, on it without AVX512-BF16/VBMI/GFNI (the int8-activation
    kernel's other unpacking paths) and on the portable (no AVX-512) build."""
    lib = native.library(request.param) if request.param != "native" else native.library()
    if lib is None:
        pytest.skip(f"{request.param} build unavailable")
    monkeypatch.setattr(native, "library", lambda variant="native": lib)
    return request.param


def _layers(cls, spec, rows, cols, bias=True):
    torch.manual_seed(rows * 7919 + cols)
    fast, ref = cls(cols, rows, spec, bias), cls(cols, rows, spec, bias, backend="reference")
    w = torch.randn(rows, cols)
    w[0, : min(cols, 8)] = 0.0  # a constant stretch and a zero-range group where groups are small
    for m in (fast, ref):
        m.set_weight(rtn(w, spec))
    if bias:
        fast.bias = ref.bias = torch.randn(rows)
    return fast, ref


def _err(fast, ref, x):
    y, y_ref = fast(x), ref(x.float())
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    return float((y.float() - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("rows,cols", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_weight_only_matches_reference(variant, spec, rows, cols, batch):
    fast, ref = _layers(QLinear, spec, rows, cols, bias=batch % 2 == 1)
    assert select("weight_only_linear", fast, torch.device("cpu")).name == "cpu_native"
    assert _err(fast, ref, torch.randn(batch, cols)) <= RTOL[torch.float32]


@pytest.mark.parametrize("lead", [(2, 3), (1,), (20,)], ids=str)
def test_weight_only_bfloat16_and_leading_dims(variant, lead):
    fast, ref = _layers(QLinear, SPECS["uint4-g128"], 64, 576)
    assert _err(fast, ref, torch.randn(*lead, 576).to(torch.bfloat16)) <= RTOL[torch.bfloat16]


def test_group_not_multiple_of_32_is_not_taken():
    fast, _ = _layers(QLinear, QuantSpec("uint4", False, PerGroup(48), "float16"), 16, 96)
    assert select("weight_only_linear", fast, torch.device("cpu")).name != "cpu_native"


@pytest.mark.parametrize("batch", [1, 2, 16, 17, 64])
@pytest.mark.parametrize("rows,cols", [(48, 576), (33, 100), (8, 1), (16, 130)], ids=str)
def test_w8a8_matches_reference(variant, rows, cols, batch):
    fast, ref = _layers(QDynamicLinear, Int8Dynamic().linear_spec(), rows, cols)
    assert select("dynamic_linear", fast, torch.device("cpu")).name == "cpu_native"
    x = torch.randn(batch, cols)
    x[0] = 0.0  # an all-zero token: scale 1, exact zeros
    assert _err(fast, ref, x) <= RTOL[torch.float32]


def test_int8_dynamic_on_a_model_keeps_ties_and_embeddings_weight_only():
    from support import tiny_llama

    model = tiny_llama(vocab=256)
    summary = quantize_(model, Int8Dynamic())
    assert type(model.lm_head) is QDynamicLinear
    assert model.lm_head.qweight is model.model.embed_tokens.qweight
    assert "lm_head" in summary.tied
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_gemv_rows_threshold_is_per_layer():
    fast, ref = _layers(QLinear, SPECS["uint4-g128"], 48, 576)
    x = torch.randn(8, 576)
    fast.native_gemv_rows = 4  # 8 rows: tiled path
    assert _err(fast, ref, x) <= RTOL[torch.float32]


def test_build_failure_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable"):
            assert native.library() is None
    finally:
        native.library.cache_clear()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    native.library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.library() is None
        fast, ref = _layers(QLinear, SPECS["uint4-g128"], 48, 576)
        assert select("weight_only_linear", fast, torch.device("cpu")).name != "cpu_native"
    finally:
        native.library.cache_clear()


def test_build_is_cached_by_content(tmp_path):
    a = native.build("generic", out_dir=tmp_path)
    assert native.build("generic", out_dir=tmp_path) == a
    assert sorted(p.name for p in tmp_path.iterdir()) == [a.name, a.name + ".sha256"]  # no temp files left
    assert cpu_native.GEMV_ROWS >= 1


@pytest.mark.parametrize("batch", [3, 40], ids=["own-kernel", "int_mm"])
def test_w8a8_asymmetric_rows_match_reference(variant, batch):
    """Rows that exercise the per-token zero point: constants of both signs, one-sided, zeros."""
    fast, ref = _layers(QDynamicLinear, Int8Dynamic().linear_spec(), 24, 70)
    x = torch.randn(batch, 70)
    x[0], x[1], x[2] = -0.75, 2.5, torch.rand(70) * 6  # constant < 0, constant > 0, all >= 0 (post-ReLU)
    x[-1] = 0.0
    assert _err(fast, ref, x) <= RTOL[torch.float32]
