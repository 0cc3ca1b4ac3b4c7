"""AWQ scale and clipping searches: rtn's layout, never worse than RTN on the calibration input, much
better with a few salient (large-magnitude) activation channels, input validation."""

import pytest
import torch

from lowbit.algorithms.awq import awq_clip, awq_scales
from lowbit.algorithms.rtn import rtn
from lowbit.core.errors import LowbitError, NonFiniteError
from lowbit.core.primitives import dequantize, quantize, to_blocks
from lowbit.core.spec import PerChannel, PerGroup, QuantSpec

SPECS = {
    "uint4-g64": QuantSpec("uint4", False, PerGroup(64), "float16"),
    "uint3-g32": QuantSpec("uint3", False, PerGroup(32), "float16"),
    "int4-g64": QuantSpec("int4", True, PerGroup(64), "float16"),
    "int3-g64-f32": QuantSpec("int3", True, PerGroup(64), "float32"),
    "uint4-g48": QuantSpec("uint4", False, PerGroup(48), "bfloat16"),  # 160 = 3 x 48 + 16
    "int4-perchannel": QuantSpec("int4", True, PerChannel(0), "float16"),
}


def data(inp=160, outs=(48, 32), rows=300, salient=4, gain=30.0, seed=0):
    """Gaussian weights ``(out_i, inp)``, inputs ``(rows, inp)``; ``salient`` channels ``gain`` x larger."""
    g = torch.Generator().manual_seed(seed)
    ws = [0.02 * torch.randn(o, inp, generator=g) for o in outs]
    x = torch.randn(rows, inp, generator=g)
    x[:, torch.randperm(inp, generator=g)[:salient]] *= gain
    return ws, x


def out_err(w, wq, x):
    return float((x.double() @ (w - wq).double().T).square().sum())


def block_out_err(w, wq, x, spec):
    """``||x_blk (w_blk - wq_blk)^T||^2`` per block ``(out, groups)``."""
    block = spec.block_size(tuple(w.shape))
    db = torch.nan_to_num(to_blocks((w - wq).double(), block), nan=0.0)
    xb = torch.nan_to_num(to_blocks(x.double(), block), nan=0.0)
    return torch.einsum("ogk,ngk->ong", db, xb).square().sum(1)


def scaled_objective(ws, x, spec, s):
    return sum(out_err(w, rtn(w * s, spec).dequantize() / s, x) for w in ws)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_clip_layout_matches_quantize(spec):
    (w, _), x = data()
    ref, qt = rtn(w, spec), awq_clip(w, x, spec)
    for a, b in ((ref.codes, qt.codes), (ref.scale, qt.scale), (ref.zero_point, qt.zero_point)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(qt.codes, quantize(w, qt.scale, qt.zero_point, spec))


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
@pytest.mark.parametrize("salient", [0, 4], ids=["iid", "salient"])
def test_clip_never_worse_than_rtn_per_block(spec, salient):
    (w, _), x = data(salient=salient, seed=1)
    c = block_out_err(w, awq_clip(w, x, spec).dequantize(), x, spec)
    r = block_out_err(w, rtn(w, spec).dequantize(), x, spec)
    assert bool((c <= r * (1 + 1e-5)).all())
    assert float(c.sum()) < float(r.sum())


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
@pytest.mark.parametrize("salient", [0, 4], ids=["iid", "salient"])
def test_scales_never_worse_than_rtn(spec, salient):
    ws, x = data(salient=salient, seed=2)
    s = awq_scales(ws, x, spec, grid=10)
    assert s.shape == (x.shape[1],) and s.dtype == torch.float32 and bool((s > 0).all())
    assert scaled_objective(ws, x, spec, s) <= scaled_objective(ws, x, spec, torch.ones_like(s)) * (1 + 1e-6)


def mixed_objective(ws, x, specs, s):
    return sum(out_err(w, rtn(w * s, sp).dequantize() / s, x) for w, sp in zip(ws, specs, strict=True))


def test_scales_take_one_spec_per_weight():
    """Linears of one input in different formats: each weight is scored in its own spec; the search
    picks the best candidate of that mixed objective (the single-spec searches pick among the same
    candidates), and one spec per weight equal to a single spec gives the same scales."""
    ws, x = data(seed=0, salient=0)
    mixed = [SPECS["uint3-g32"], SPECS["uint4-g64"]]
    assert torch.equal(awq_scales(ws, x, [mixed[0]] * 2, grid=10), awq_scales(ws, x, mixed[0], grid=10))
    s = awq_scales(ws, x, mixed, grid=10)
    singles = [awq_scales(ws, x, spec, grid=10) for spec in mixed]
    assert not any(torch.equal(s, o) for o in singles)  # on this data the mixed search picks neither
    best = mixed_objective(ws, x, mixed, s)
    for other in [torch.ones_like(s), *singles]:
        assert best <= mixed_objective(ws, x, mixed, other) * (1 + 1e-6)
    with pytest.raises(LowbitError, match="3 specs for 2 weights"):
        awq_scales(ws, x, [*mixed, mixed[0]])


@pytest.mark.parametrize(
    ("spec", "limit_scales", "limit_both"),
    [
        (SPECS["uint4-g64"], 0.35, 0.3),  # measured 0.232, 0.198
        (SPECS["int4-g64"], 0.3, 0.2),  # measured 0.187, 0.131
        (SPECS["uint3-g32"], 0.3, 0.2),  # measured 0.191, 0.127
    ],
    ids=["uint4-g64", "int4-g64", "uint3-g32"],
)
def test_salient_channels_much_better_than_rtn(spec, limit_scales, limit_both):
    """The AWQ pipeline: scale columns, clip the scaled weight on the scaled input, undo the scale."""
    ws, x = data(seed=3)
    s = awq_scales(ws, x, spec)
    base = scaled_objective(ws, x, spec, torch.ones_like(s))
    scales_only = scaled_objective(ws, x, spec, s) / base
    both = sum(out_err(w, awq_clip(w * s, x / s, spec).dequantize() / s, x) for w in ws) / base
    print(f"{spec.format}: scales {scales_only:.3f}, scales + clip {both:.3f} of RTN's output error")
    assert scales_only < limit_scales and both < limit_both


def test_clip_on_grid_weight_exact():
    """Codes +-7 in every int4 group, power-of-two scales: RTN is exact, and awq_clip keeps it so."""
    spec = SPECS["int4-g64"]
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(-7, 8, (48, 160), generator=g)
    codes[:, ::64], codes[:, 1::64], codes[:, -1] = -7, 7, 7
    scale = 2.0 ** torch.randint(-9, -4, (48, 3), generator=g).float()
    w = dequantize(codes.to(torch.int8), scale.half(), torch.zeros(48, 3, dtype=torch.int8), spec)
    x = data(seed=4)[1]
    assert torch.equal(rtn(w, spec).dequantize(), w)
    assert torch.equal(awq_clip(w, x, spec).dequantize(), w)


def test_clip_without_shrink_is_rtn():
    spec = SPECS["uint3-g32"]
    (w, _), x = data()
    a, b = awq_clip(w, x, spec, max_shrink=0.0), rtn(w, spec)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    assert torch.equal(a.zero_point, b.zero_point)


def test_scales_identity_when_activations_are_flat():
    ws, _ = data()
    x = torch.ones(50, 160)
    assert torch.equal(awq_scales(ws, x, SPECS["uint4-g64"]), torch.ones(160))


def test_leading_dims_and_subsampling():
    spec = SPECS["uint4-g64"]
    ws, x = data(rows=400, seed=5)
    assert torch.equal(awq_scales(ws, x.reshape(4, 100, -1), spec), awq_scales(ws, x, spec))
    sub = x[torch.linspace(0, 399, 100).round().long()]
    a = awq_clip(ws[0], x, spec, max_rows=100)
    b = awq_clip(ws[0], sub, spec)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    assert torch.equal(awq_scales(ws, x, spec, max_rows=100), awq_scales(ws, x, spec, max_rows=100))


def test_nan_input_raises():
    ws, x = data()
    x[7, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="input x of mlp.up_proj"):
        awq_scales(ws, x, SPECS["uint4-g64"], name="mlp.up_proj")
    with pytest.raises(NonFiniteError, match="input x"):
        awq_clip(ws[0], x, SPECS["uint4-g64"])
    ws, x = data()
    ws[1][0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"weight\[1\]"):
        awq_scales(ws, x, SPECS["uint4-g64"])


def test_shape_mismatch_names_shapes():
    ws, x = data()
    ws[1] = ws[1][:, :100]
    with pytest.raises(LowbitError, match=r"\(32, 100\).*\(300, 160\)"):
        awq_scales(ws, x, SPECS["uint4-g64"])
    with pytest.raises(LowbitError, match=r"\(48, 160\).*\(300, 150\)"):
        awq_clip(data()[0][0], x[:, :150], SPECS["uint4-g64"])
    with pytest.raises(LowbitError, match=r"\(160,\)"):
        awq_clip(data()[0][0], x[0], SPECS["uint4-g64"])


@pytest.mark.parametrize(
    "call",
    [
        lambda w, x, spec: awq_scales([w], x, spec),
        lambda w, x, spec: awq_clip(w, x, spec),
    ],
    ids=["scales", "clip"],
)
def test_empty_x_raises(call):
    (w, _), x = data()
    with pytest.raises(LowbitError, match="no rows"):
        call(w, x[:0], SPECS["uint4-g64"])


def test_bad_arguments_raise():
    ws, x = data()
    spec = SPECS["uint4-g64"]
    with pytest.raises(LowbitError, match="no weights"):
        awq_scales([], x, spec)
    for kwargs in ({"grid": 0}, {"max_shrink": 1.0}, {"max_rows": 0}):
        with pytest.raises(LowbitError):
            awq_clip(ws[0], x, spec, **kwargs)
    with pytest.raises(LowbitError, match="inside one row"):
        awq_clip(ws[0], x, QuantSpec("uint4", False, PerGroup(16, axis=0)))


def test_dequantize_roundtrip_of_clip_result():
    spec = SPECS["uint4-g48"]
    (w, _), x = data()
    qt = awq_clip(w, x, spec)
    assert torch.equal(qt.dequantize(), dequantize(qt.codes, qt.scale, qt.zero_point, spec))
