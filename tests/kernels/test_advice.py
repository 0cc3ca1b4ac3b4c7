"""Measured advice: routes from latencies, applied to layers, followed by dispatch, cached atomically."""

import pytest
import torch
from torch import nn

from lowbit import PerChannel, QLinear, QuantSpec, parse_scheme, quantize_
from lowbit.core.errors import LowbitError
from lowbit.kernels import advice as adv
from lowbit.kernels.registry import dispatch, select

SPEC = QuantSpec("int8", True, PerChannel(0), "float16")


def _entry(native, ref, fp=(5, 5, 5, 5)):
    return {"batches": [1, 4, 16, 64], "us": {"fp32": list(fp), "cpu_native": native, "reference": ref}}


def _layer():
    m = nn.Sequential(nn.Linear(64, 32))
    quantize_(m, parse_scheme("w8"))
    return m


def test_routes_take_the_fastest_quantized_backend_per_batch():
    a = adv.Advice(entries={"k": _entry([1, 5, 30, 300], [10, 20, 25, 100])})
    assert a.routes("k") == ((4, "cpu_native"), (64, "reference"))
    a = adv.Advice(entries={"k": _entry([1, 2, None, None], [10, 20, 25, 100])})  # cut off: not measured
    assert a.routes("k") == ((4, "cpu_native"), (64, "reference"))
    assert a.routes("missing") is None


def test_dispatch_follows_routes_and_falls_back():
    m = _layer()
    q = m[0]
    key = adv.entry_key("weight_only_linear", 32, 64, q.spec)
    a = adv.Advice(entries={key: _entry([1, 5, 30, 300], [10, 20, 25, 100])})
    assert adv.apply_advice(m, a) == 1 and q.routes == ((4, "cpu_native"), (64, "reference"))
    ref_fn = select("weight_only_linear", q, torch.device("cpu"), "reference").fn
    assert dispatch("weight_only_linear", q, torch.randn(20, 64)) is ref_fn
    assert dispatch("weight_only_linear", q, torch.randn(1000, 64)) is ref_fn  # beyond the last: last
    default = select("weight_only_linear", q, torch.device("cpu")).fn
    q.routes = ((8, "cpu_int4pack"),)  # cannot run int8 weights: normal selection, no error
    assert dispatch("weight_only_linear", q, torch.randn(2, 64)) is default
    x = torch.randn(3, 64)
    torch.testing.assert_close(m(x), QLinear.forward(q, x))


def test_prefer_beats_routes():
    q = _layer()[0]
    q.routes = ((1 << 30, "reference"),)
    q.backend = "cpu_int8pack"
    fn = dispatch("weight_only_linear", q, torch.randn(2, 64), q.backend)
    assert fn is select("weight_only_linear", q, torch.device("cpu"), "cpu_int8pack").fn


def test_json_round_trip_and_bad_input():
    a = adv.Advice(adv.machine(), {"k": _entry([1, 2, 3, 4], [5, 6, 7, 8])})
    b = adv.Advice.from_json(a.to_json())
    assert b.entries == a.entries and b.machine == a.machine
    with pytest.raises(LowbitError, match="not valid JSON"):
        adv.Advice.from_json("{oops", "cache.json")
    with pytest.raises(LowbitError, match="newer"):
        adv.Advice.from_json('{"version": 99}')


def test_cache_is_written_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    assert adv.load_cached().entries == {}
    a = adv.Advice(adv.machine(), {"k": _entry([1, 2, 3, 4], [5, 6, 7, 8])})
    p = adv.save_cached(a)
    assert p.parent == tmp_path / "advice" and [f.name for f in p.parent.iterdir()] == [p.name]
    assert adv.load_cached().entries == a.entries


def test_spec_key_names_what_kernels_care_about():
    assert adv.spec_key(SPEC) == "int8/sym/per_channel(axis=0)/float16"
