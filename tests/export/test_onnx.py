"""ONNX QDQ export: ONNX Runtime and onnx.reference run it and agree with lowbit's own integer forward.

Measured on these nets: ONNX Runtime and onnx.reference outputs equal lowbit's bit for bit; the
tolerance (two output steps) leaves room for the one-code requantization ties documented in
``lowbit.core.fixed_point``. ONNX Runtime is held to that only on CPUs where its int8 sums are exact
(``support.ort_int8_exact``: VNNI, or not x86).
"""

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit import LowbitError, StaticW8A8, quantize_
from lowbit.export import export_onnx

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx.reference import ReferenceEvaluator  # noqa: E402
from tests.transforms.test_static import _batches, _cnn  # noqa: E402

from support import assert_ort_matches  # noqa: E402


class Encoderish(nn.Module):
    """Token embedding, a 3-d Linear (exported as Transpose -> MatMul -> Add), LayerNorm, GELU, Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb, self.up = nn.Embedding(50, 16), nn.Linear(16, 32)
        self.norm, self.down = nn.LayerNorm(32), nn.Linear(32, 8, bias=False)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask[..., None]
        return self.down(nn.functional.gelu(self.norm(self.up(h))))


def _ids(b, s, seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 50, (b, s), generator=g), "attention_mask": torch.ones(b, s)}


def _ort(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("equalize", [False, True], ids=["plain", "equalized"])
def test_cnn_qdq_matches_lowbit(tmp_path, equalize):
    net = _cnn()
    s = quantize_(net, StaticW8A8(equalize=equalize), calib=_batches())
    assert len(s.equalized) == (2 if equalize else 0)  # conv -> ReLU -> depthwise -> ReLU6 (fused) -> conv
    x = torch.randn(6, 1, 12, 12)
    path = export_onnx(net, x[:1], tmp_path / "cnn.onnx")
    ops = _ops(path)
    assert ops.count("QuantizeLinear") == 7 and "BatchNormalization" not in ops  # Linear: float output
    with torch.no_grad():
        ours = net(x).numpy()
    tol = 1e-5 * np.abs(ours).max()  # float32 rounding of the last (float-output) layer; codes equal
    assert_ort_matches(_ort(path, {"input": x}), ours, tol)
    ref = ReferenceEvaluator(str(path)).run(None, {"input": x.numpy()})[0]
    assert np.abs(ref - ours).max() <= tol


@pytest.mark.parametrize(
    ("channels", "padded"), [(1, 1), (3, 4), (4, 4), (5, 8)], ids=["c1-kept", "c3-to-4", "c4-kept", "c5-to-8"]
)
def test_few_channel_conv_input_is_padded(tmp_path, channels, padded):
    """Convs with 3+ input channels not a multiple of 4 read zero-point-padded codes (ONNX Runtime's fast
    int8 conv wants multiples of 4); outputs still equal lowbit's."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(channels, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    g = torch.Generator().manual_seed(5)
    calib = [torch.rand(8, channels, 10, 10, generator=g) * 2 - 0.5 for _ in range(3)]
    quantize_(net, StaticW8A8(), calib=calib)
    x = torch.rand(4, channels, 10, 10) * 2 - 0.5
    path = export_onnx(net, x[:1], tmp_path / "net.onnx")
    model = onnx.load(str(path))
    weights = {t.name: t for t in model.graph.initializer}
    assert list(weights["0.weight_quantized"].dims) == [8, padded, 3, 3]
    assert _ops(path).count("Pad") == (padded != channels)
    with torch.no_grad():
        ours = net(x).numpy()
    tol = 1e-5 * np.abs(ours).max()
    assert_ort_matches(_ort(path, {"input": x}), ours, tol)
    assert np.abs(ReferenceEvaluator(str(path)).run(None, {"input": x.numpy()})[0] - ours).max() <= tol


def test_int8_outputs_everywhere(tmp_path):
    net = _cnn()
    quantize_(net, StaticW8A8(int8_outputs="all"), calib=_batches())
    x = torch.randn(6, 1, 12, 12)
    path = export_onnx(net, x[:1], tmp_path / "cnn.onnx")
    assert _ops(path).count("QuantizeLinear") == 8
    with torch.no_grad():
        ours = net(x).numpy()
    assert np.abs(_ort(path, {"input": x}) - ours).max() <= 2 * float(net[6].output_scale)


def test_encoder_qdq_with_named_inputs(tmp_path):
    model = Encoderish().eval()
    quantize_(model, StaticW8A8(observer="percentile"), calib=[_ids(4, 7, s) for s in range(3)])
    path = export_onnx(model, _ids(1, 5, 9), tmp_path / "enc.onnx")
    assert "Transpose" not in _ops(path)  # weights stored transposed, int8
    feeds = _ids(3, 11, 10)  # other batch and sequence sizes: dynamic axes
    with torch.no_grad():
        ours = model(**feeds).numpy()
    assert_ort_matches(_ort(path, feeds), ours, 1e-5 * np.abs(ours).max())
    ref = ReferenceEvaluator(str(path)).run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    assert np.abs(ref - ours).max() <= 1e-5 * np.abs(ours).max()


class SharedInput(nn.Module):
    """Three 3-d Linears reading one tensor (as q/k/v projections do), then one reading their sum."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        return self.o(self.q(x) * self.k(x) + self.v(x))


def test_layers_reading_one_tensor_share_its_qdq(tmp_path):
    model = SharedInput().eval()
    quantize_(model, StaticW8A8(), calib=[torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(s))
                                          for s in range(3)])  # fmt: skip
    x = torch.randn(2, 7, 16)
    path = export_onnx(model, x[:1], tmp_path / "shared.onnx")
    assert _ops(path).count("QuantizeLinear") == 2  # one for x (q, k, v), one for o's input
    with torch.no_grad():
        ours = model(x).numpy()
    assert_ort_matches(_ort(path, {"input": x}), ours, 1e-5 * np.abs(ours).max())
    ref = ReferenceEvaluator(str(path)).run(None, {"input": x.numpy()})[0]
    assert np.abs(ref - ours).max() <= 1e-5 * np.abs(ours).max()


def test_float_model_exports_as_is(tmp_path):
    net = _cnn()
    x = torch.randn(2, 1, 12, 12)
    path = export_onnx(net, x, tmp_path / "f.onnx")
    assert "QuantizeLinear" not in _ops(path)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(path, {"input": x}), net(x).numpy(), atol=1e-5)


def test_weight_only_models_are_refused(tmp_path):
    net = nn.Sequential(nn.Linear(8, 8))
    quantize_(net, lowbit.WeightOnly(bits=8, group_size=None))
    with pytest.raises(LowbitError, match="weight-only and dynamic layers are not exported"):
        export_onnx(net, torch.randn(1, 8), tmp_path / "w.onnx")
    assert not (tmp_path / "w.onnx").exists()


def test_existing_output_is_kept(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep")
    with pytest.raises(LowbitError, match="already exists"):
        export_onnx(_cnn(), torch.randn(1, 1, 12, 12), out)
    assert out.read_bytes() == b"keep"
    export_onnx(_cnn(), torch.randn(1, 1, 12, 12), out, overwrite=True)
    assert out.read_bytes() != b"keep" and not list(tmp_path.glob(".m.onnx.tmp-*"))
