"""Per-layer errors (lowbit.eval.layers): the float weights put into the quantized basis, so rescaled
models (AWQ, equalization, ReLU6 stretching, BN folding) are compared like plain ones; a broken layer is
the one with the lowest local SQNR; saved checkpoints give the same figures."""

import copy

import pytest
import torch
from tests.transforms.test_equalize import _net

import lowbit
from lowbit.eval.layers import first_below, layer_errors, sqnr_db, worst
from support import tiny_llama


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(hidden=64, intermediate=128)


def _calib(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (2, 32), generator=g) for _ in range(n)]


def _quantized(ref, method):
    q = copy.deepcopy(ref)
    lowbit.quantize_(q, lowbit.WeightOnly(bits=4, group_size=32, method=method), calib=_calib())
    return q


def test_sqnr_edges():
    assert sqnr_db(1.0, 0.0) == float("inf") and sqnr_db(0.0, 1.0) == float("-inf")
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_weight_only_layers_measured_in_call_order(llama, method):
    q = _quantized(llama, method)
    errs = layer_errors(q, llama, _calib(2))
    assert [e.order for e in errs] == list(range(len(errs)))
    assert errs[0].name == "model.embed_tokens" and errs[1].name.endswith("q_proj")
    for e in errs:  # 4-bit g32 on Gaussian weights: ~22 dB; a wrong basis or shape would be far off
        assert 19 < e.weight_sqnr_db < 25 and 19 < e.output_sqnr_db < 27, e
        assert e.end_to_end_sqnr_db is not None and e.end_to_end_sqnr_db <= e.output_sqnr_db + 1
        assert e.format == "uint4 g32 asym" and e.bytes > 0


def test_awq_basis_recorded_saved_and_needed(llama, tmp_path):
    q = _quantized(llama, "awq")
    assert q.lowbit_basis and all(set(v) <= {"rows", "inputs"} for v in q.lowbit_basis.values())
    before = layer_errors(q, llama)
    lowbit.save(q, tmp_path / "awq")
    back = lowbit.load(tmp_path / "awq", model=tiny_llama(hidden=64, intermediate=128))
    assert back.lowbit_basis.keys() == q.lowbit_basis.keys()
    after = layer_errors(back, llama)
    assert [e.weight_sqnr_db for e in after] == pytest.approx([e.weight_sqnr_db for e in before])
    back.lowbit_basis = None  # as a streamed checkpoint: rescaled, basis unknown -> no figures
    unknown = layer_errors(back, llama)
    assert all(e.weight_sqnr_db is None and "basis" in e.note for e in unknown)


def test_rtn_checkpoint_records_empty_basis(llama, tmp_path):
    lowbit.save(_quantized(llama, "rtn"), tmp_path / "rtn")
    back = lowbit.load(tmp_path / "rtn", model=tiny_llama(hidden=64, intermediate=128))
    assert back.lowbit_basis == {}


def test_broken_scale_is_the_first_layer_below_threshold(llama):
    q = _quantized(llama, "rtn")
    broken = "model.layers.1.self_attn.v_proj"
    with torch.no_grad():
        q.get_submodule(broken).scale[3] *= 100  # one output channel's scales
    errs = layer_errors(q, llama, _calib(2))
    assert first_below(errs, 15.0).name == broken
    assert worst(errs, 1)[0].name == broken and len(worst(errs, 10)) == 10
    bad = next(e for e in errs if e.name == broken)
    assert bad.output_sqnr_db < 0 and bad.weight_sqnr_db < 0


@pytest.mark.parametrize("equalize", [False, True])
def test_static_cnn_rescaled_and_fused(equalize):
    ref = _net(act=torch.nn.ReLU6)
    q = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, 10, 10, generator=g) for _ in range(4)]
    lowbit.quantize_(q, lowbit.StaticW8A8(equalize=equalize, stretch_relu6=True), calib=calib)
    assert q.lowbit_basis  # stretched (and equalized) channels
    errs = layer_errors(q, ref, calib[:2])
    assert len(errs) == 9 and all(e.order >= 0 for e in errs)
    assert all(e.weight_sqnr_db > 40 for e in errs)  # 8-bit weights per channel, BN folded alike
    if not equalize:  # fused ReLU/ReLU6 applied to the reference: every output within 8-bit error
        assert all(e.output_sqnr_db > 30 and e.end_to_end_sqnr_db > 30 for e in errs), errs
    q.lowbit_basis = {}  # a wrong basis shows up as large weight errors
    assert min(e.weight_sqnr_db for e in layer_errors(q, ref)) < 30


def test_without_reference_lists_layers_only(llama):
    errs = layer_errors(_quantized(llama, "rtn"), None)
    assert errs and all(e.weight_sqnr_db is None for e in errs)
    with pytest.raises(lowbit.LowbitError, match="no quantized layer"):
        layer_errors(llama, llama)
