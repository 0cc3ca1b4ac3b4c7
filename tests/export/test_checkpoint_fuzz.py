"""Fuzz: mutated ``quant_config.json`` and truncated or bit-flipped ``model.safetensors``.

Property: ``lowbit.load`` either succeeds with a model bit-identical to the unmutated checkpoint's (same
tensors, same module entries) or raises ``LowbitError``; never another exception, and never a different
model. With ``verify=False`` (checksums skipped) a config mutation may load a different model, but the
outcome is still success or ``LowbitError``. The checkpoint holds every saved module type. Hypothesis
runs derandomized (the same examples each run), 560 in all.
"""

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit import LowbitError
from lowbit.algorithms.rtn import rtn
from lowbit.core.spec import PerChannel, PerGroup, QuantSpec
from lowbit.nn.dynamic import QDynamicLinear
from lowbit.nn.modules import QEmbedding, QLinear, QuantizedModule
from lowbit.nn.outliers import QLinearOutlier
from lowbit.nn.static import QStaticAdd, QStaticConv2d, QStaticLinear

FUZZ = {
    "max_examples": 140,
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
FLOATS = ("emb", "wo", "dyn", "outl", "slin", "conv", "add")


def _quantized_weight(q, w):
    q.set_weight(rtn(w, q.spec))
    return q


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    g16 = QuantSpec("uint4", False, PerGroup(16), "float16")
    i8 = QuantSpec("int8", True, PerChannel(0), "float32")
    m.emb = _quantized_weight(
        QEmbedding(40, 32, QuantSpec("uint8", False, PerChannel(0), "float32")), torch.randn(40, 32)
    )
    m.wo = _quantized_weight(QLinear(32, 24, g16), torch.randn(24, 32))
    m.dyn = _quantized_weight(QDynamicLinear(24, 16, i8, bias=False), torch.randn(16, 24))
    m.outl = QLinearOutlier.from_float(nn.Linear(16, 12), torch.tensor([3, 7]))
    m.slin = _quantized_weight(QStaticLinear(12, 8, i8), torch.randn(8, 12))
    conv = {"in_channels": 4, "out_channels": 6, "kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1),
            "dilation": (1, 1), "groups": 2}  # fmt: skip
    m.conv = _quantized_weight(QStaticConv2d(conv, i8), torch.randn(6, 18))
    m.add = QStaticAdd()
    m.norm = nn.LayerNorm(8)
    m.folded = nn.Identity()  # a BatchNorm folded away: the skeleton's is replaced on load
    m.lowbit_identity = ["folded"]
    m.lowbit_inputs = {"input": {"shape": [2, 8], "dtype": "float32"}}
    return m


def _skeleton() -> nn.Module:
    m = nn.Module()
    for name in FLOATS:
        setattr(m, name, nn.Identity())
    m.norm, m.folded = nn.LayerNorm(8), nn.BatchNorm1d(8)
    return m


def _fingerprint(model: nn.Module) -> tuple:
    state = {
        k: (v.dtype, v.shape, v.contiguous().view(-1).view(torch.uint8).tolist())
        for k, v in model.state_dict().items()
    }
    entries = {f: m.config_entry() for f, m in model.named_modules() if isinstance(m, QuantizedModule)}
    extra = [(f, getattr(m, "requantize_output", None)) for f, m in model.named_modules()]
    return state, json.dumps(entries, sort_keys=True), extra, model.lowbit_identity, model.lowbit_inputs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = lowbit.save(_model(), tmp_path_factory.mktemp("fuzz") / "ref")
    meta = json.loads((folder / "quant_config.json").read_text())
    return folder, meta, _fingerprint(lowbit.load(folder, model=_skeleton()))


def _load_outcome(folder, fingerprint, verify=True, identical=True) -> str:
    try:
        model = lowbit.load(folder, model=_skeleton(), verify=verify)
    except LowbitError:
        return "refused"
    if identical:
        assert _fingerprint(model) == fingerprint, "a corrupted checkpoint loaded as a different model"
    return "loaded"


def _paths(obj, prefix=()):
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, (*prefix, k))


def _mutate(meta, data):
    """One structural edit of ``meta`` at a drawn path: replace, delete, or insert a key."""
    path = data.draw(st.sampled_from(sorted(_paths(meta), key=str)))
    op = data.draw(st.sampled_from(["replace", "delete", "insert"]))
    if not path:
        return data.draw(JSON)
    parent = meta
    for k in path[:-1]:
        parent = parent[k]
    if op == "replace" or (op == "delete" and isinstance(parent, list)):
        parent[path[-1]] = data.draw(JSON)
    elif op == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(max_size=8))] = data.draw(JSON)
    else:
        parent.insert(path[-1], data.draw(JSON))
    return meta


def _copy(reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("case") / "ck"
    shutil.copytree(reference[0], out)
    return out


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@settings(**FUZZ)
@given(data=st.data())
def test_config_mutations(reference, tmp_path_factory, verify, data):
    folder = _copy(reference, tmp_path_factory)
    meta = _mutate(json.loads(json.dumps(reference[1])), data)
    (folder / "quant_config.json").write_text(json.dumps(meta))
    _load_outcome(folder, reference[2], verify=verify, identical=verify)


@settings(**FUZZ)
@given(data=st.data())
def test_config_byte_flips(reference, tmp_path_factory, data):
    folder = _copy(reference, tmp_path_factory)
    raw = bytearray((folder / "quant_config.json").read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    (folder / "quant_config.json").write_bytes(bytes(raw))
    _load_outcome(folder, reference[2])


@settings(**FUZZ)
@given(data=st.data())
def test_safetensors_flips_and_truncation(reference, tmp_path_factory, data):
    folder = _copy(reference, tmp_path_factory)
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "flip-header", "truncate", "append"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "append":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    else:
        header_end = 8 + int.from_bytes(raw[:8], "little")
        hi = header_end - 1 if kind == "flip-header" else len(raw) - 1
        for _ in range(data.draw(st.integers(1, 3))):
            raw[data.draw(st.integers(0, hi))] ^= 1 << data.draw(st.integers(0, 7))
    path.write_bytes(bytes(raw))
    _load_outcome(folder, reference[2])


def test_reference_loads_bit_identically(reference, tmp_path_factory):
    folder = _copy(reference, tmp_path_factory)
    assert _load_outcome(folder, reference[2]) == "loaded"
    assert _load_outcome(folder, _fingerprint(_model())) == "loaded"  # and equals the model saved
