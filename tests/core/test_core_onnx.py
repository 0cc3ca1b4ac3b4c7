"""Exact: lowbit's integer quantize/dequantize are bit-identical to ONNX QuantizeLinear/DequantizeLinear.

A QuantizeLinear -> DequantizeLinear graph (opset 21) gets lowbit's own scale and zero point as
initializers and is run by ``onnx.reference.ReferenceEvaluator`` and by onnxruntime (CPU). Codes leave the
graph through a ``Cast`` to int8/uint8 (onnxruntime cannot hand int4 tensors to numpy).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from coreutil import expand

from lowbit.core import (
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

OPSET = 21  # first opset with INT4/UINT4 and the block_size attribute
ONNX_TYPE = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8,
             "int4": TensorProto.INT4, "uint4": TensorProto.UINT4}  # fmt: skip
SHAPE = (8, 40)
GROUP = 16  # 40 = 2 x 16 + 8: the last block of every row is partial
# id -> (granularity, onnx attributes, onnx qparam shape)
LAYOUTS = {
    "per-tensor": (PerTensor(), {}, ()),
    "per-axis0": (PerChannel(0), {"axis": 0}, (SHAPE[0],)),
    "per-axis1": (PerChannel(1), {"axis": 1}, (SHAPE[1],)),
    "blocked-axis1": (PerGroup(GROUP, axis=1), {"axis": 1, "block_size": GROUP}, (SHAPE[0], 3)),
}
DATA = ["random", "clipped", "beyond-range", "ties"]


def _model(name: str, scale: torch.Tensor, zp: torch.Tensor, attrs: dict, pshape: tuple[int, ...]):
    qt, ct = ONNX_TYPE[name], TensorProto.INT8 if name.startswith("int") else TensorProto.UINT8
    inits = [
        helper.make_tensor("s", TensorProto.FLOAT, pshape, scale.float().flatten().tolist()),
        helper.make_tensor("z", qt, pshape, zp.flatten().tolist()),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["qq"], **attrs),
        helper.make_node("DequantizeLinear", ["qq", "s", "z"], ["y"], **attrs),
        helper.make_node("Cast", ["qq"], ["q"], to=ct),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [
            helper.make_tensor_value_info("q", ct, SHAPE),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _run(runtime: str, model, x: np.ndarray):
    if runtime == "reference":
        return ReferenceEvaluator(model).run(None, {"x": x})
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the Q/DQ kernels as is
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _data(kind: str, spec: QuantSpec, seed: int):
    """(x, scale, zero_point): qparams always come from lowbit's choose_qparams."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g) * 3 + 0.5
    scale, zp = choose_qparams(base, spec)
    if kind == "beyond-range":  # most of the tensor saturates at qmin or qmax
        return base * 5, scale, zp
    if kind == "ties":  # x / s is exactly k + 0.5 (float16 scales: 11 significant bits; k + 0.5: <= 10)
        s = expand(scale.float(), SHAPE, spec.block_size(SHAPE))
        span = spec.fmt.qmax - spec.fmt.qmin  # k covers the range and a little beyond
        k = torch.randint(-span - 2, span + 2, SHAPE, generator=g).float()
        x = (k + 0.5) * s
        assert torch.equal(x.double() / s.double(), k.double() + 0.5)
        return x, scale, zp
    return base, scale, zp


@pytest.mark.parametrize("runtime", ["reference", "onnxruntime"])
@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("name", list(ONNX_TYPE))
def test_bit_identical_to_onnx(name, symmetric, layout, data, runtime):
    gran, attrs, pshape = LAYOUTS[layout]
    spec = QuantSpec(
        name,
        symmetric=symmetric,
        granularity=gran,
        scale_dtype="float16" if data == "ties" else "float32",  # fed to ONNX as (exact) float32
        clip_ratio=0.7 if data == "clipped" else 1.0,
    )
    x, scale, zp = _data(data, spec, seed=len(name) * 31 + len(layout))
    codes = quantize(x, scale, zp, spec)
    deq = dequantize(codes, scale, zp, spec)

    q_onnx, y_onnx = _run(runtime, _model(name, scale, zp, attrs, pshape), x.numpy())
    assert np.array_equal(q_onnx.astype(np.int16), codes.numpy().astype(np.int16))
    assert np.array_equal(y_onnx.view(np.int32), deq.numpy().view(np.int32))  # bit-identical
    fmt = spec.fmt
    if data == "beyond-range":
        assert (codes == fmt.qmin).any() and (codes == fmt.qmax).any()  # saturation was exercised
    if data == "ties":  # every unclamped tie went to the even integer (half to even, not half away)
        z = expand(zp.long(), SHAPE, spec.block_size(SHAPE))
        inside = (codes > fmt.qmin) & (codes < fmt.qmax)
        assert inside.sum() > inside.numel() // 5
        assert ((codes.long() - z)[inside] % 2 == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dequantize_saturates_where_onnx_overflows(dtype):
    """The one documented difference from ONNX: an asymmetric grid may end half a step past its range
    (int2 on +-3e38: zero point 0, code -2 -> -4e38); the plain formula gives -inf, lowbit the dtype's max."""
    big = 3e38 if dtype == torch.float32 else 65504.0
    x = torch.tensor([[-big, 0.0, 1.0, big]], dtype=dtype)
    spec = QuantSpec("int2", symmetric=False)
    scale, zp = choose_qparams(x, spec)
    codes = quantize(x, scale, zp, spec)
    assert codes.tolist() == [[-2, 0, 0, 1]] and zp.item() == 0
    plain = ((codes.float() - zp.float()) * scale.float()).to(dtype)  # DequantizeLinear's formula
    assert torch.isneginf(plain[0, 0])
    out = dequantize(codes, scale, zp, spec, dtype=dtype)
    assert out[0, 0] == -torch.finfo(dtype).max
    assert torch.equal(out[0, 1:], plain[0, 1:])
    assert torch.isfinite(fake_quantize(x, spec)).all()
