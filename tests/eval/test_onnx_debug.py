"""``lowbit.eval.onnx_debug``: a static W8A8 QDQ export compared layer by layer with its float model in
ONNX Runtime, and one deliberately broken layer found.

Measured here (graph optimizations off, so ONNX Runtime's int8 kernels play no part): every layer of the
CNN and of the residual net is 31.9 to 58.5 dB above the float model, against lowbit's float export
(matched by tensor name) and torch's own export with BatchNorm folded (matched by module scope) alike.
A weight scale x100 drops its layer to -9.5 dB, an output activation scale x100 its layer to 1.6 dB.
"""

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from lowbit import LowbitError, StaticW8A8, quantize_
from lowbit.export import export_onnx

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402
from tests.export.test_onnx_residual import _batches as _res_batches  # noqa: E402
from tests.export.test_onnx_residual import _resnet  # noqa: E402
from tests.transforms.test_static import _batches as _cnn_batches  # noqa: E402
from tests.transforms.test_static import _cnn  # noqa: E402

from lowbit.eval.onnx_debug import compare_onnx, format_debug  # noqa: E402

NETS = {  # builder, calibration, input shape, layer names (lowbit fqns) in graph order
    "cnn": (_cnn, _cnn_batches, (1, 12, 12), ["0.0", "1.0", "2", "6"]),
    "residual": (_resnet, _res_batches, (1, 6, 6),
                 ["0", "1.conv.0", "1.conv.2", "1.add", "2.conv.0", "2.conv.2", "2.add", "3", "5"]),
}  # fmt: skip
MIN_SQNR_DB = 25.0  # lowest measured: 31.9 dB (residual net, 2.conv.0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{net: {"qdq": path, "lowbit": float export by lowbit, "torch": float export by torch}}."""
    out = {}
    for name, (build, calib, shape, _) in NETS.items():
        tmp = tmp_path_factory.mktemp(name)
        net = build()
        ref = copy.deepcopy(net)
        quantize_(net, StaticW8A8(), calib=calib())
        x = torch.randn(1, *shape)
        out[name] = {"qdq": export_onnx(net, x, tmp / "qdq.onnx"), "torch": tmp / "torch.onnx",
                     "lowbit": export_onnx(ref, x, tmp / "float.onnx")}  # fmt: skip
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(ref, (x,), out[name]["torch"], dynamo=False, input_names=["input"],
                              dynamic_axes={"input": {0: "batch"}})  # fmt: skip
    return out


def _feeds(net, n=2, batch=8):
    shape = NETS[net][2]
    return [{"input": np.random.default_rng(s).standard_normal((batch, *shape)).astype(np.float32)}
            for s in range(n)]  # fmt: skip


def _scaled(src, dst, initializer, factor):
    """Copy of the ONNX model ``src`` at ``dst`` with the initializer ``initializer`` times ``factor``."""
    model = onnx.load(str(src))
    (t,) = [t for t in model.graph.initializer if t.name == initializer]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), initializer))
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize(("reference", "rule"), [("lowbit", "name"), ("torch", "scope")], ids=str)
def test_every_layer_matched_and_close(exported, net, reference, rule):
    paths = exported[net]
    before = {k: p.read_bytes() for k, p in paths.items()}
    result = compare_onnx(paths[reference], paths["qdq"], _feeds(net))
    assert [x.name for x in result.layers] == NETS[net][3]
    assert {x.matched_by for x in result.layers} == {rule}
    assert result.unmatched_float == result.unmatched_qdq == []
    assert min(x.sqnr_db for x in result.layers) > MIN_SQNR_DB
    assert result.first_below() is None and result.inputs == 2
    assert {k: p.read_bytes() for k, p in paths.items()} == before  # the files are only read
    conv = result.layers[0]
    assert conv.act_scale > 0 and conv.outside < 0.01 and conv.weight_scale[0] > 0
    json.dumps(result.to_dict(), allow_nan=False)


def test_weight_scale_x100_names_its_layer(exported, tmp_path):
    paths = exported["cnn"]
    broken = _scaled(paths["qdq"], tmp_path / "broken.onnx", "1.0.weight_scale", 100)
    result = compare_onnx(paths["torch"], broken, _feeds("cnn"), threshold_db=20.0)
    first = result.first_below()
    assert first is not None and first.name == "1.0" and first.module == "1.0" and first.op == "Conv"
    assert first.sqnr_db < 0  # measured -9.5 dB: outputs saturate at the top of the uint8 range
    assert result.layers[0].sqnr_db > MIN_SQNR_DB  # the layer before is untouched
    good = compare_onnx(paths["torch"], paths["qdq"], _feeds("cnn"))
    assert first.weight_scale[1] == pytest.approx(100 * good.layers[1].weight_scale[1], rel=1e-5)
    text = format_debug(result)
    assert "first layer below 20 dB: 1.0 (Conv" in text
    assert [line.split()[1] for line in text.splitlines() if line.startswith(">>")] == ["1.0", "1.0"]


def test_activation_scale_x100_names_its_layer(exported, tmp_path):
    paths = exported["residual"]
    broken = _scaled(paths["qdq"], tmp_path / "broken.onnx", "1.conv.2.output_scale", 100)
    result = compare_onnx(paths["lowbit"], broken, _feeds("residual"))
    first = result.first_below()
    assert first.name == "1.conv.2" and first.sqnr_db < 5  # measured 1.6 dB: a few codes span the range
    assert all(x.sqnr_db > MIN_SQNR_DB for x in result.layers[:2])
    good = compare_onnx(paths["lowbit"], paths["qdq"], _feeds("residual"))
    assert first.act_scale == pytest.approx(100 * good.layers[2].act_scale, rel=1e-5)
    assert result.worst(3)[0].sqnr_db == min(x.sqnr_db for x in result.layers) and len(result.worst(3)) == 3
    assert result.first_below(threshold_db=-100.0) is None


def test_not_onnx(exported, tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("not a model\n")
    with pytest.raises(LowbitError, match="is not an ONNX model"):
        compare_onnx(exported["cnn"]["lowbit"], text, _feeds("cnn"))
    with pytest.raises(LowbitError, match="no such ONNX file"):
        compare_onnx(tmp_path / "missing.onnx", exported["cnn"]["qdq"], _feeds("cnn"))


@pytest.mark.parametrize(
    ("feed", "match"),
    [
        ({"x": np.zeros((2, 1, 12, 12), np.float32)}, "match neither"),
        ({"input": np.zeros((2, 3, 12, 12), np.float32)}, r"shape \[2, 3, 12, 12\]"),
        ({"input": np.zeros((1, 12, 12), np.float32)}, "shape"),
        ({"input": np.zeros((2, 1, 12, 12), np.int64)}, "int64"),
        ([], "at least one input"),
    ],
    ids=["name", "channels", "rank", "dtype", "empty"],
)
def test_inputs_that_do_not_fit(exported, feed, match):
    with pytest.raises(LowbitError, match=match):
        compare_onnx(exported["cnn"]["lowbit"], exported["cnn"]["qdq"], feed)


def test_nothing_matchable(exported, tmp_path):
    x = helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["n", 1, 12, 12])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 1, 12, 12])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["y"], name="/other/Relu")], "g", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    with pytest.raises(LowbitError, match="no layer of .* matches"):
        compare_onnx(path, exported["cnn"]["qdq"], _feeds("cnn"))
