"""QLinear / QEmbedding: buffers as documented, forwards equal the float ops on the dequantized weight."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.algorithms import rtn
from lowbit.core import LowbitError, PerChannel, PerGroup, PerTensor, QuantSpec
from lowbit.core.codec import stored_bytes
from lowbit.nn import QEmbedding, QLinear

SPECS = {
    "int8-channel": QuantSpec("int8", True, PerChannel(0), "float16"),
    "uint4-g128": QuantSpec("uint4", False, PerGroup(128), "float16"),
    "uint3-g64": QuantSpec("uint3", False, PerGroup(64), "float32"),
    "int2-g32": QuantSpec("int2", True, PerGroup(32), "bfloat16"),
    "nf4-g64": QuantSpec("nf4", True, PerGroup(64)),
    "fp8-channel": QuantSpec("fp8_e4m3", True, PerChannel(0)),
}


def _qlinear(spec, out_f=40, in_f=200, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias)
    q = QLinear.from_float(lin, spec)
    q.backend = "reference"  # exact semantics here; fast backends are checked in tests/kernels
    q.set_weight(rtn(lin.weight.detach(), spec))
    if bias:
        q.bias = lin.bias.detach().clone()
    return lin, q


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_qlinear_buffers_and_forward(spec):
    lin, q = _qlinear(spec)
    assert q.qweight.dtype == torch.uint8
    assert tuple(q.qweight.shape) == (40, stored_bytes(200, spec.fmt))
    assert q.scale.dtype == spec.torch_scale_dtype
    assert (q.zero_point is not None) == (spec.fmt.kind == "int")
    x = torch.randn(3, 5, 200)
    expected = F.linear(x, rtn(lin.weight.detach(), spec).dequantize(), lin.bias)
    torch.testing.assert_close(q(x), expected, rtol=0, atol=0)


def test_qlinear_without_bias_and_repr():
    _, q = _qlinear(SPECS["uint4-g128"], bias=False)
    assert q.bias is None
    assert "uint4 g128 asym" in repr(q)


def test_set_weight_rejects_wrong_shape():
    _, q = _qlinear(SPECS["int8-channel"])
    with pytest.raises(LowbitError, match="does not fit"):
        q.set_weight(rtn(torch.randn(41, 200), SPECS["int8-channel"]))


@pytest.mark.parametrize(
    "spec",
    [SPECS["int8-channel"], SPECS["uint4-g128"], QuantSpec("int8")],
    ids=["per-row", "per-group", "per-tensor"],
)
def test_qembedding_gathers_only_rows_it_needs(spec):
    torch.manual_seed(0)
    emb = nn.Embedding(300, 200)
    q = QEmbedding.from_float(emb, spec)
    q.set_weight(rtn(emb.weight.detach(), spec))
    ids = torch.tensor([[0, 5, 299], [7, 7, 1]])
    torch.testing.assert_close(q(ids), F.embedding(ids, q.dequantized_weight()), rtol=0, atol=0)


def test_qembedding_refuses_column_granularity():
    with pytest.raises(LowbitError, match="per-row"):
        QEmbedding(10, 8, QuantSpec("int8", True, PerChannel(1)))


def test_shared_weights_are_one_storage():
    spec = SPECS["uint4-g128"]
    emb = nn.Embedding(64, 200)
    qe = QEmbedding.from_float(emb, spec)
    qe.set_weight(rtn(emb.weight.detach(), spec))
    head = QLinear(200, 64, spec, bias=False)
    head.share_weight(qe)
    assert head.qweight is qe.qweight and head.scale is qe.scale
    with pytest.raises(LowbitError, match="same weight shape"):
        QLinear(200, 63, spec, bias=False).share_weight(qe)


def test_per_tensor_linear():
    _, q = _qlinear(QuantSpec("int8", True, PerTensor()))
    assert q.scale.shape == (1, 1)
