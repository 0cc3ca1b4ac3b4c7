"""TFLite export (``lowbit export --format tflite``): LiteRT's interpreter runs lowbit's static int8 CNNs
and their float models (as fp32) and agrees with lowbit's forward; the file holds lowbit's weight codes,
biases and qparams exactly; bad input is one line and exit code 2, with nothing written.

Measured on mnist-cnn (default ``StaticW8A8``, 256 MNIST train images; 2,000 test images): LiteRT's
default CPU path (XNNPACK) gave lowbit's codes in every conv layer, logits within 0.020 of lowbit's (7
images off at all, argmax always equal); TFLite's builtin kernels (``BUILTIN_REF``) round twice when
they requantize, so 0.03% (first conv) to 5% (last conv) of the codes differ by 1-3, logits by up to
0.099 (fashion-mnist-cnn: 0.154, argmax 99.75% equal).
"""

import json
import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit import LowbitError, QStaticConv2d, QStaticLinear, StaticW8A8, quantize_
from lowbit.export.tflite import export_tflite
from lowbit.export.tflite_ops import conv_padding
from lowbit.kernels.integer import integer_params, weight_values

litert = pytest.importorskip("ai_edge_litert.interpreter")
from tests.transforms.test_static import _batches, _cnn  # noqa: E402

from support import run_cli  # noqa: E402

R = litert.OpResolverType
# resolver -> (max |logit difference| to lowbit's, least argmax agreement) on mnist-cnn (measured above)
TOLERANCE = {R.AUTO: (0.1, 0.998), R.BUILTIN_REF: (0.5, 0.99)}


def _interpreter(path, resolver=R.AUTO):
    return litert.Interpreter(model_path=str(path), num_threads=1, experimental_op_resolver_type=resolver)


def _run(path, x: torch.Tensor, resolver=R.AUTO) -> np.ndarray:
    """The file's output for NCHW batch ``x``, fed NHWC (the file's layout) at its batch size."""
    it = _interpreter(path, resolver)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], [x.shape[0], *x.shape[2:], x.shape[1]])
    it.allocate_tensors()
    it.set_tensor(inp["index"], x.permute(0, 2, 3, 1).contiguous().numpy())
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def _tensors(path) -> dict:
    """name -> LiteRT's tensor details plus ``value`` (a constant's data) of every tensor in the file."""
    it = _interpreter(path, R.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    return {d["name"]: d | {"value": it.get_tensor(d["index"])} for d in it.get_tensor_details()}


def _ops(path) -> list[tuple[str, str]]:
    """(operator, fused activation or "") of every operator in the file, in order (read with the schema)."""
    from ai_edge_litert import schema_py_generated as s

    model = s.ModelT.InitFromPackedBuf(bytearray(path.read_bytes()), 0)
    names = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    acts = {v: k for k, v in vars(s.ActivationFunctionType).items() if not k.startswith("_")}
    out = []
    for op in model.subgraphs[0].operators:
        code = model.operatorCodes[op.opcodeIndex].builtinCode
        act = getattr(op.builtinOptions, "fusedActivationFunction", None)
        out.append((names[code], acts[act] if act is not None else ""))
    return out


@pytest.fixture(scope="module")
def mnist_static(tmp_path_factory):
    """(checkpoint folder, loaded model) of mnist-cnn quantized by the CLI: w8a8-static, 256 MNIST images."""
    from lowbit.cli.main import main

    out = tmp_path_factory.mktemp("tflite") / "q"
    argv = ["quantize", "--model", "mnist-cnn", "--scheme", "w8a8-static", "--calib", "mnist:256",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return out, lowbit.load(out)


def test_cli_export_runs_in_litert_like_lowbit(mnist_static, tmp_path, capsys):
    ckpt, model = mnist_static
    path = tmp_path / "m.tflite"
    code, out, _ = run_cli(capsys, "export", str(ckpt), "--format", "tflite", "--out", str(path), "--json")
    stats = json.loads(out)
    assert code == 0 and stats["precision"] == "int8" and stats["bytes"] == path.stat().st_size
    assert stats["input"]["shape"] == [1, 28, 28, 1] and stats["input"]["layout"] == "NHWC"
    assert stats["op_counts"] == {"QUANTIZE": 1, "PAD": 2, "CONV_2D": 4, "DEPTHWISE_CONV_2D": 2,
                                  "RESHAPE": 1, "DEQUANTIZE": 2, "FULLY_CONNECTED": 1}  # fmt: skip
    x = lowbit.data.mnist("test")[0][:1000]
    with torch.no_grad():
        ours = model(x).numpy()
    for resolver, (tol, agree) in TOLERANCE.items():
        got = _run(path, x, resolver)
        assert got.shape == ours.shape and np.abs(got - ours).max() <= tol, resolver
        assert (got.argmax(1) == ours.argmax(1)).mean() >= agree, resolver


def test_file_holds_lowbit_codes_and_qparams(mnist_static, tmp_path):
    _, model = mnist_static
    path = tmp_path / "m.tflite"
    export_tflite(model, path)
    t = _tensors(path)
    layers = {f: m for f, m in model.named_modules() if isinstance(m, (QStaticConv2d, QStaticLinear))}
    assert len(layers) == 7
    for fqn, m in layers.items():
        codes = weight_values(m).numpy()
        w, b = t[f"{fqn}.weight"], t[f"{fqn}.bias"]
        q = w["quantization_parameters"]
        if isinstance(m, QStaticConv2d):
            codes = codes.reshape(m.weight_shape)
            depthwise = m.conv["groups"] > 1
            codes = codes.transpose((1, 2, 3, 0) if depthwise else (0, 2, 3, 1))  # [1,kh,kw,C] / OHWI
            assert q["quantized_dimension"] == (3 if depthwise else 0)
        else:  # it reads the flattened 64 x 7 x 7 map in NHWC order: its columns are reordered to match
            codes = codes.reshape(10, 64, 7, 7).transpose(0, 2, 3, 1).reshape(10, -1)
        assert w["dtype"] == np.int8 and np.array_equal(w["value"], codes), fqn
        assert np.array_equal(q["scales"], m.scale.float().reshape(-1).numpy()) and not q["zero_points"].any()
        x_scale = float(m.input_scale)
        if m.requantize_output:  # int32 bias: lowbit's own codes, scale x_scale * w_scale
            bias_q, _, _ = integer_params(m)
            assert b["dtype"] == np.int32 and np.array_equal(b["value"], bias_q.numpy()), fqn
            bs = b["quantization_parameters"]["scales"]
            assert np.allclose(bs, x_scale * m.scale.double().reshape(-1).numpy(), rtol=1e-7, atol=0)
            out_scale, out_zp = t[fqn]["quantization"]  # uint8 zero point z -> int8 z - 128
            assert out_scale == np.float32(m.output_scale) and out_zp == int(m.output_zero_point) - 128
        else:  # the float-output classifier: float bias after DEQUANTIZE
            assert b["dtype"] == np.float32 and np.array_equal(b["value"], m.bias.numpy())
    first = t["features.0.0.input_quantized"]["quantization"]
    assert first == (
        np.float32(model.features[0][0].input_scale),
        int(model.features[0][0].input_zero_point) - 128,
    )
    ops = _ops(path)
    assert ops[0] == ("QUANTIZE", "") and ops[-1] == ("FULLY_CONNECTED", "NONE")
    convs = [act for op, act in ops if "CONV" in op]  # the ReLUs lowbit absorbed into output ranges:
    ends = [255 * float(m.output_scale) for m in layers.values() if isinstance(m, QStaticConv2d)]
    assert convs == ["RELU6" if end <= 6 else "RELU" for end in ends]  # RELU6 where the range ends <= 6
    assert all(int(m.output_zero_point) == 0 for m in layers.values() if isinstance(m, QStaticConv2d))


def test_fp32_export_matches_float_model(tmp_path, capsys):
    path = tmp_path / "f32.tflite"
    code, out, _ = run_cli(capsys, "export", "mnist-cnn", "--format", "tflite", "--out", str(path), "--json")
    assert code == 0 and json.loads(out)["precision"] == "float32"
    assert {op for op, _ in _ops(path)} == {
        "PAD",
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "RESHAPE",
        "FULLY_CONNECTED",
    }
    model, _ = lowbit.models.load("mnist-cnn")
    x = lowbit.data.mnist("test")[0][:256]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(_run(path, x) - ref).max() <= 1e-4  # 2.1e-5 measured (BatchNorm folded, float sums)


class Pooled(nn.Module):
    """Conv -> explicit ReLU -> MaxPool -> conv -> view(n, -1) of a 3x3 map -> Linear (NHWC flatten)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.c1, self.c2 = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        x = self.c2(self.pool(torch.relu(self.c1(x))))
        return self.fc(x.view(x.size(0), -1))


NETS = {  # id -> (net, StaticW8A8 options, calibration batches, an op the file must have, tolerance)
    # same codes as lowbit's, float rounding of the float-output Linear (measured 6e-8)
    "cnn": (_cnn, {}, _batches, "MEAN", lambda net: 1e-5),
    # int8 Linear output, DEQUANTIZE last: the same codes (measured 0); two steps for requantization ties
    "int8-outputs": (_cnn, {"int8_outputs": "all"}, _batches, "FULLY_CONNECTED",
                     lambda net: 2 * float(net[6].output_scale)),
    # symmetric int8, ReLUs not absorbed: QUANTIZE int8 -> int8 between layers rounds once where lowbit
    # dequantizes and quantizes (measured 0.0010, logits up to 0.31)
    "int8-activations": (_cnn, {"activation_format": "int8"}, _batches, "MEAN", lambda net: 0.005),
    # explicit ReLU fused into the conv, MaxPool on codes, NHWC-order flatten (measured 0.0021, logits 0.44)
    "pool-view": (Pooled, {"fuse_activations": False}, lambda: [torch.randn(8, 2, 12, 12) for _ in range(3)],
                  "MAX_POOL_2D", lambda net: 0.01),
}  # fmt: skip


@pytest.mark.parametrize("name", list(NETS))
def test_small_nets_agree_with_lowbit(tmp_path, name):
    """Random weights: a check of the mapping (pools, flatten order, int8 outputs, symmetric codes), not
    an accuracy claim."""
    build, options, calib, op, tol = NETS[name]
    torch.manual_seed(7)
    net = build()
    quantize_(net, StaticW8A8(**options), calib=calib())
    x = calib()[0][:6] * 1.1
    path = tmp_path / "n.tflite"
    export_tflite(net, path)
    assert op in {o for o, _ in _ops(path)}
    with torch.no_grad():
        ours = net(x).numpy()
    assert np.abs(_run(path, x) - ours).max() <= tol(net)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding", "expected"),
    [
        (112, 3, 1, 1, ("SAME", None)),
        (224, 3, 2, 1, ("VALID", [[1, 0], [1, 0]])),  # TFLite's SAME would pad bottom/right, torch top/left
        (13, 3, 2, 1, ("SAME", None)),  # odd size: the same padding both ways
        (7, 1, 1, 0, ("VALID", None)),
        (10, 5, 1, 1, ("VALID", [[1, 1], [1, 1]])),  # less than SAME: explicit
    ],
    ids=["s1-same", "s2-even-pad", "s2-odd-same", "1x1-valid", "k5-p1"],
)
def test_conv_padding(size, kernel, stride, padding, expected):
    conv = {"kernel_size": kernel, "stride": stride, "padding": padding, "dilation": 1}
    assert conv_padding((size, size), conv) == expected


@pytest.mark.parametrize(
    ("scheme", "message"),
    [
        (["--scheme", "w8"], "classifier is QLinear (int8 per_channel sym); TFLite export takes static int8"),
        (["--scheme", "w8a8"], "is QDynamicLinear"),
        (["--scheme", "w4a8-static", "--calib", "mnist:64"], "features.0.0 has int4 weights"),
    ],
    ids=["weight-only", "dynamic", "int4-static"],
)
def test_cli_refuses_what_tflite_cannot_run(capsys, tmp_path, scheme, message):
    ckpt, out = tmp_path / "q", tmp_path / "m.tflite"
    code, _, _ = run_cli(capsys, "quantize", "--model", "mnist-cnn", *scheme, "--out", str(ckpt), "--quiet")
    assert code == 0
    code, _, err = run_cli(capsys, "export", str(ckpt), "--format", "tflite", "--out", str(out))
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no file, no temp file


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, groups=2)

    def forward(self, x):
        return self.conv(x)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)

    def forward(self, x):
        return torch.sigmoid(self.conv(x))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (Grouped, "conv is a grouped conv (groups=2); TFLite export writes groups=1 and depthwise"),
        (Gated, "sigmoid (call_function sigmoid) has no TFLite mapping"),
    ],
    ids=["grouped-conv", "sigmoid"],
)
def test_ops_without_mapping_are_refused(tmp_path, build, message):
    torch.manual_seed(0)
    net = build().eval()
    quantize_(net, StaticW8A8(), calib=[torch.randn(4, 4, 8, 8) for _ in range(2)])
    with pytest.raises(LowbitError, match=re.escape(message)):
        export_tflite(net, tmp_path / "n.tflite")
    assert not any(tmp_path.iterdir())


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(20, 8), nn.Linear(8, 4)

    def forward(self, input_ids):
        return self.fc(self.emb(input_ids))


def test_models_without_one_image_input_are_refused(tmp_path):
    torch.manual_seed(0)
    net = Tokens().eval()
    quantize_(net, StaticW8A8(), calib=[{"input_ids": torch.randint(0, 20, (2, 5))} for _ in range(2)])
    with pytest.raises(LowbitError, match=r"one float image input; this model takes input_ids \(int64\)"):
        export_tflite(net, tmp_path / "n.tflite")
    assert not any(tmp_path.iterdir())


def test_existing_file_is_replaced_only_with_overwrite(tmp_path):
    net = _cnn()
    path = tmp_path / "n.tflite"
    path.write_bytes(b"old")
    with pytest.raises(LowbitError, match="already exists"):
        export_tflite(net, path, input_shape=(1, 12, 12))
    assert path.read_bytes() == b"old"
    stats = export_tflite(net, path, overwrite=True, input_shape=(1, 12, 12))
    assert stats["precision"] == "float32" and path.read_bytes()[4:8] == b"TFL3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.tflite"]


def test_missing_litert_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.delitem(sys.modules, "ai_edge_litert.schema_py_generated", raising=False)
    with pytest.raises(LowbitError, match=r"pip install lowbit\[tflite\]"):
        export_tflite(_cnn(), tmp_path / "n.tflite", input_shape=(1, 12, 12))
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_mobilenetv2_int8_and_fp32(tmp_path):
    """MobileNetV2 on photo crops: fp32 file = float model; int8 file (32 calibration crops) agrees with
    lowbit's static model (all of benchmarks/tflite_litert.py's 480 eval crops: see its results)."""
    from lowbit.data.vision import photo_crops
    from lowbit.workflows import calibration_batches

    model, _ = lowbit.models.load("mobilenetv2")
    x = photo_crops("eval", 48)
    export_tflite(model, tmp_path / "f32.tflite")
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(_run(tmp_path / "f32.tflite", x) - ref).max() <= 1e-4  # 3.3e-5 measured
    quantize_(model, StaticW8A8(), calib=calibration_batches("photos:32"))
    stats = export_tflite(model, tmp_path / "i8.tflite")
    assert stats["op_counts"]["ADD"] == 10 and stats["op_counts"]["MEAN"] == 1
    assert stats["bytes"] < 0.3 * (tmp_path / "f32.tflite").stat().st_size
    with torch.no_grad():
        ours = model(x).numpy()
    got = _run(tmp_path / "i8.tflite", x)
    assert (got.argmax(1) == ours.argmax(1)).mean() >= 0.95
