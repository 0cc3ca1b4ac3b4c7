"""Float and codebook formats: codes are torch casts or nearest levels; level tables are the published."""

from __future__ import annotations

import pytest
import torch
from coreutil import LAYOUT_IDS, LAYOUTS, expand

from lowbit.core import FORMATS, PerGroup, QuantSpec, choose_qparams, dequantize, get_format, quantize

FLOATS = ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"]
CODEBOOKS = ["nf4", "log2", "binary"]
BITS_VIEW = {1: torch.uint8, 2: torch.int16}  # itemsize -> integer view for bit comparisons


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS_VIEW[t.element_size()])


def _data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g).exp() * 4


@pytest.mark.parametrize(("layout", "shape", "gran"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("name", FLOATS)
def test_float_codes_are_torch_casts(name, layout, shape, gran):
    spec = QuantSpec(name, granularity=gran)
    fmt = spec.fmt
    x = _data(shape)
    scale, zp = choose_qparams(x, spec)
    assert zp is None
    s = expand(scale.float(), shape, spec.block_size(shape))
    codes = quantize(x, scale, None, spec)
    assert codes.dtype == fmt.torch_dtype
    assert torch.equal(_bits(codes), _bits((x / s).to(fmt.torch_dtype)))  # in range here: a plain cast
    if fmt.bits == 16:
        assert torch.equal(scale, torch.ones_like(scale))  # fp16/bf16: a cast, no scaling
    else:  # fp8: the block's largest magnitude lands on +-float_max
        amax = (x / s).abs().amax()
        assert amax == pytest.approx(fmt.float_max, rel=1e-6)
        assert codes.float().abs().amax() == fmt.float_max
    assert torch.equal(dequantize(codes, scale, None, spec), codes.float() * s)


@pytest.mark.parametrize("name", FLOATS)
def test_float_saturates_instead_of_overflowing(name):
    """Beyond-range values clamp to +-float_max (a plain cast would give inf, or NaN for e4m3fn)."""
    fmt = get_format(name)
    spec = QuantSpec(name)
    big = torch.finfo(torch.float32).max  # a bf16 cast of float32's max is already inf
    x = torch.tensor([[-big, -3.0, 0.0, 2.0, big]])
    scale = torch.tensor([[1.0]])
    codes = quantize(x, scale, None, spec)
    assert codes.float()[0].tolist() == [-fmt.float_max, -3.0, 0.0, 2.0, fmt.float_max]
    assert torch.isfinite(dequantize(codes, scale, None, spec)).all()


def _nf4_from_quantiles() -> torch.Tensor:
    """QLoRA's construction (bitsandbytes ``create_normal_map``): N(0,1) quantiles, 8 positive, 7 negative."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    offset = 0.9677083
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return v / v.abs().max()


def test_nf4_levels_are_the_qlora_table():
    levels = torch.tensor(FORMATS["nf4"].levels, dtype=torch.float64)
    assert levels.numel() == 16 == 1 << FORMATS["nf4"].bits
    assert levels[0] == -1.0 and levels[-1] == 1.0 and (levels == 0).sum() == 1
    assert (levels.diff() > 0).all()
    torch.testing.assert_close(levels, _nf4_from_quantiles(), rtol=0, atol=1e-6)


def test_log2_levels_are_powers_of_two():
    levels = FORMATS["log2"].levels
    assert len(levels) == 15 <= 1 << FORMATS["log2"].bits
    assert list(levels) == sorted(levels) and 0.0 in levels
    nonzero = [v for v in levels if v != 0]
    assert sorted(abs(v) for v in nonzero) == sorted(2.0**-k for k in range(7) for _ in (0, 1))
    assert all(float(abs(v)).hex().startswith("0x1.0000000000000p") for v in nonzero)  # exact powers of two
    assert sorted(nonzero) == sorted(-v for v in nonzero)


@pytest.mark.parametrize("name", CODEBOOKS)
def test_codebook_picks_nearest_level(name):
    spec = QuantSpec(name, granularity=PerGroup(16))
    x = _data((6, 50), seed=1)
    scale, _ = choose_qparams(x, spec)
    codes = quantize(x, scale, None, spec)
    assert codes.dtype == torch.uint8
    levels = torch.tensor(get_format(name).levels)
    v = x / expand(scale.float(), x.shape, spec.block_size(x.shape))
    dist = (v[..., None] - levels).abs()
    best = dist.gather(-1, codes.long()[..., None])[..., 0]
    assert torch.equal(best, dist.amin(-1))  # the chosen level is a nearest one (ties: either)
    out = dequantize(codes, scale, None, spec)
    assert torch.equal(out, levels[codes.long()] * expand(scale.float(), x.shape, spec.block_size(x.shape)))


def test_binary_is_sign_times_mean_abs():
    x = torch.tensor([[0.5, -1.5, 2.0, -0.25], [3.0, 3.0, 3.0, 3.0]])
    spec = QuantSpec("binary", granularity=PerGroup(4))
    scale, _ = choose_qparams(x, spec)
    assert scale.flatten().tolist() == [1.0625, 3.0]  # mean |x|; a constant block: |c|
    codes = quantize(x, scale, None, spec)
    assert codes.tolist() == [[1, 0, 1, 0], [1, 1, 1, 1]]
    assert dequantize(codes, scale, None, spec).tolist() == [[1.0625, -1.0625, 1.0625, -1.0625], [3.0] * 4]


@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
def test_binary_all_zero_block_reads_tiny(scale_dtype):
    """binary has no zero level: an all-zero block comes back as +-tiny (documented), not +-1."""
    spec = QuantSpec("binary", granularity=PerGroup(4), scale_dtype=scale_dtype)
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, -2.0]])
    scale, _ = choose_qparams(x, spec)
    tiny = torch.finfo(spec.torch_scale_dtype).tiny
    assert scale.float()[0, 0] == tiny
    out = dequantize(quantize(x, scale, None, spec), scale, None, spec)
    assert out[0, :4].abs().eq(tiny).all()
    assert out[0, 4:].tolist() == [1.5, -1.5]
