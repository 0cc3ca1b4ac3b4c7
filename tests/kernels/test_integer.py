"""Integer-only static W8A8 ops against ONNX Runtime's QLinearConv / QLinearMatMul, code for code.

ONNX Runtime requantizes in float32 with round-half-even, lowbit in fixed point with round-half-up
(``lowbit.core.fixed_point``): outputs may differ by one code where ``acc * M`` sits on a half-integer
within float32 rounding. Measured here: at most ~0.1% of outputs differ, never by more than 1.
"""

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.core.codec import decode
from lowbit.core.primitives import qparams_from_range, quantize
from lowbit.kernels.integer import integer_params, qlinear
from lowbit.nn.static import ACTIVATION_SPECS, WEIGHT_SPEC, QStaticConv2d, QStaticLinear
from lowbit.transforms.static import quantize_weight

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from support import ort_int8_exact  # noqa: E402

MAX_MISMATCH = 0.002  # fraction of output codes allowed to differ (by exactly 1)


def _set_qparams(q, act, x_range, y_range):
    for side, (lo, hi) in (("input", x_range), ("output", y_range)):
        s, zp = qparams_from_range(torch.tensor(float(lo)), torch.tensor(float(hi)), act)
        q.set_activation_qparams(side, s, zp)


def _static(float_mod, act_name, x):
    act = ACTIVATION_SPECS[act_name]
    q = (
        QStaticConv2d.from_float(float_mod, WEIGHT_SPEC, act)
        if isinstance(float_mod, nn.Conv2d)
        else (QStaticLinear.from_float(float_mod, WEIGHT_SPEC, act))
    )
    q.set_weight(quantize_weight(float_mod.weight, "minmax", "w"))
    if float_mod.bias is not None:
        q.bias = float_mod.bias.detach().clone()
    with torch.no_grad():
        y = float_mod(x)
    _set_qparams(q, act, (x.min(), x.max()), (y.min(), y.max()))
    return q


def _run(node, inputs, out_type):
    ins = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for n, v in inputs.items()
    ]
    out = helper.make_tensor_value_info("y", out_type, None)
    graph = helper.make_graph([node], "g", ins, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)[0]


def _np(t, dtype=None):
    a = t.detach().cpu().numpy()
    return a.astype(dtype) if dtype else a


def _needs_exact_ort(act):
    if act == "uint8" and not ort_int8_exact():
        pytest.skip("ONNX Runtime's uint8 x int8 sums saturate at int16 on this CPU (no VNNI)")


CONVS = {
    "3x3": dict(in_channels=8, out_channels=16, kernel_size=3, padding=1),
    "strided": dict(in_channels=6, out_channels=10, kernel_size=3, stride=2, padding=1, bias=False),
    "depthwise": dict(in_channels=12, out_channels=12, kernel_size=3, padding=1, groups=12),
    "pointwise": dict(in_channels=24, out_channels=7, kernel_size=1),
}


@pytest.mark.parametrize("act", ["uint8", "int8"])
@pytest.mark.parametrize("name", list(CONVS))
def test_qlinear_conv_matches_onnxruntime(name, act):
    _needs_exact_ort(act)
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONVS[name]).eval()
    x = torch.randn(2, conv.in_channels, 9, 11) * 2 + (0.5 if act == "uint8" else 0.0)
    q = _static(conv, act, x)
    xq = quantize(x, q.input_scale.reshape(1, 1, 1, 1), q.input_zero_point.reshape(1, 1, 1, 1), q.act_spec)
    ours = qlinear(xq, q).numpy()
    bias, _, _ = integer_params(q)
    c = q.conv
    attrs = dict(
        kernel_shape=list(c["kernel_size"]),
        strides=list(c["stride"]),
        pads=[*c["padding"]] * 2,
        dilations=list(c["dilation"]),
        group=c["groups"],
    )
    codes = decode(q.qweight, q.spec.fmt, q.cols).reshape(q.weight_shape)
    names = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"] + (["b"] if bias is not None else [])
    inputs = {
        "x": _np(xq),
        "xs": _np(q.input_scale, np.float32),
        "xz": _np(q.input_zero_point),
        "w": _np(codes),
        "ws": _np(q.scale.reshape(-1), np.float32),
        "wz": np.zeros(q.rows, np.int8),
        "ys": _np(q.output_scale, np.float32),
        "yz": _np(q.output_zero_point),
    }
    if bias is not None:
        inputs["b"] = _np(bias, np.int32)
    node = helper.make_node("QLinearConv", names, ["y"], **attrs)
    theirs = _run(node, inputs, TensorProto.UINT8 if act == "uint8" else TensorProto.INT8)
    assert theirs.shape == ours.shape
    diff = np.abs(ours.astype(np.int32) - theirs.astype(np.int32))
    assert diff.max() <= 1
    assert (diff > 0).mean() <= MAX_MISMATCH


@pytest.mark.parametrize("act", ["uint8", "int8"])
def test_qlinear_matmul_matches_onnxruntime(act):
    _needs_exact_ort(act)
    torch.manual_seed(1)
    lin = nn.Linear(96, 40, bias=False).eval()
    x = torch.randn(3, 5, 96)
    q = _static(lin, act, x)
    xq = quantize(x, q.input_scale.reshape(1, 1, 1), q.input_zero_point.reshape(1, 1, 1), q.act_spec)
    ours = qlinear(xq, q).numpy()
    codes = decode(q.qweight, q.spec.fmt, q.cols)
    inputs = {
        "a": _np(xq),
        "as": _np(q.input_scale, np.float32),
        "az": _np(q.input_zero_point),
        "b": np.ascontiguousarray(_np(codes).T),
        "bs": _np(q.scale.reshape(-1), np.float32),
        "bz": np.zeros(q.rows, np.int8),
        "ys": _np(q.output_scale, np.float32),
        "yz": _np(q.output_zero_point),
    }
    node = helper.make_node("QLinearMatMul", list(inputs), ["y"])
    theirs = _run(node, inputs, TensorProto.UINT8 if act == "uint8" else TensorProto.INT8)
    diff = np.abs(ours.astype(np.int32) - theirs.astype(np.int32))
    assert diff.max() <= 1
    assert (diff > 0).mean() <= MAX_MISMATCH


def test_static_forward_close_to_float():
    """The float-in/float-out forward is within a few output steps of the float layer."""
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(1, 8, 16, 16)
    q = _static(conv, "uint8", x)
    with torch.no_grad():
        err = (q(x) - conv(x)).abs().max()
    assert err < 4 * float(q.output_scale)


@pytest.mark.parametrize("in_channels,wide", [(64, False), (2048, True)], ids=["float32", "float64"])
def test_accumulate_exact_in_float32_and_float64(in_channels, wide):
    """The float32 path (partial sums provably below 2**24) and the float64 one give the exact integers."""
    from lowbit.kernels import integer

    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight.uniform_(-1, 1)  # codes up to 127: a 2048 x 3 x 3 row sums past 2**24 / 255
    x = torch.rand(2, in_channels, 6, 6) * 4
    q = _static(conv, "uint8", x)
    xq = integer.quantize_activation(x, q)
    l1 = float(integer.weight_values(q).abs().sum(1).max())
    assert (255 * l1 >= 2**24) == wide
    w = integer.weight_values(q).reshape(q.weight_shape)
    want = torch.nn.functional.conv2d(xq.double() - q.input_zero_point.double(), w, None, 1, 1)
    assert torch.equal(integer._accumulate(xq, q), want)
