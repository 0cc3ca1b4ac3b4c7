"""Residual adds as ``lowbit.nn.Add`` modules: quantized by StaticW8A8, exported so that ONNX Runtime
runs QLinearAdd (no float Add between dequantize and quantize nodes), saved and loaded.

Tolerance: ONNX Runtime's QLinearAdd rescales each input to the output scale before adding, so a sum
that lands on a rounding tie can come out one output code away from lowbit's ``q(dq(a) + dq(b))``;
onnx.reference runs the unfused DQ -> Add -> Q graph, lowbit's own arithmetic.
"""

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit import StaticW8A8, quantize_
from lowbit.export import export_onnx
from lowbit.nn import Add, QStaticAdd

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx.reference import ReferenceEvaluator  # noqa: E402

from support import assert_ort_matches  # noqa: E402


class Block(nn.Module):
    """x + conv(relu(conv(x))), the skip written with an ``Add`` module."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 1))
        self.add = Add()

    def forward(self, x):
        return self.add(x, self.conv(x))


def _resnet():
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        Block(8),
        Block(8),
        nn.Conv2d(8, 4, 1),
        nn.Flatten(),
        nn.Linear(4 * 36, 5),
    ).eval()


def _batches(n=4):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, 1, 6, 6, generator=g) for _ in range(n)]


@pytest.fixture()
def quantized():
    net = _resnet()
    summary = quantize_(net, StaticW8A8(), calib=_batches())
    return net, summary


def test_adds_are_quantized(quantized):
    net, summary = quantized
    assert isinstance(net[1].add, QStaticAdd) and isinstance(net[2].add, QStaticAdd)
    assert {"1.add", "2.add"} <= set(summary.quantized) and "Add" not in summary.float_ops
    a, b = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    q = net[1].add
    step = float(q.output_scale)
    codes = torch.round((a + b) / step) + float(q.output_zero_point)
    want = (codes.clamp(0, 255) - float(q.output_zero_point)) * step
    assert torch.allclose(q(a, b), want, atol=1e-6)


def test_int8_outputs_none_leaves_adds_float():
    net = _resnet()
    quantize_(net, StaticW8A8(int8_outputs="none"), calib=_batches())
    assert type(net[1].add) is Add


def test_ort_fuses_qlinearadd_and_matches(quantized, tmp_path):
    net, _ = quantized
    x = torch.randn(6, 1, 6, 6)
    path = export_onnx(net, x[:1], tmp_path / "res.onnx")
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert ops.count("QLinearAdd") == 2 and "Add" not in ops and "Gemm" not in ops
    with torch.no_grad():
        ours = net(x).numpy()
    ref = ReferenceEvaluator(str(path)).run(None, {"input": x.numpy()})[0]
    assert np.abs(ref - ours).max() <= 1e-5 * np.abs(ours).max()
    # one code of the last Add, carried through two float-output layers, bounds ORT's difference
    got = sess.run(None, {"input": x.numpy()})[0]
    assert_ort_matches(got, ours, 0.05 * np.abs(ours).max())


def test_save_load_round_trip(quantized, tmp_path):
    net, _ = quantized
    lowbit.save(net, tmp_path / "ckpt")
    back = lowbit.load(tmp_path / "ckpt", model=_resnet())
    assert isinstance(back[1].add, QStaticAdd)
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(back(x), net(x))
