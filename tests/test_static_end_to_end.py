"""Static W8A8 on the bundled real models, end to end: calibrate, quantize, save, load, export, run in
ONNX Runtime. Accuracy targets are measured in full by benchmarks/static_ptq.py; here, on slices."""

import json

import pytest
import torch

import lowbit
from lowbit.cli.main import main
from lowbit.eval import accuracy
from support import assert_ort_matches, ort_int8_exact

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow


def test_mnist_cnn_cli_quantize_export_run(tmp_path, capsys):
    out, onnx_path = tmp_path / "q", tmp_path / "m.onnx"
    argv = ["quantize", "--model", "mnist-cnn", "--scheme", "w8a8-static", "--calib", "mnist:256",
            "--observer", "percentile", "--out", str(out), "--quiet", "--json"]  # fmt: skip
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["quantized_modules"] == 7 and stats["folded_batchnorm"] == 6
    assert main(["export", str(out), "--out", str(onnx_path), "--json"]) == 0
    capsys.readouterr()
    images, labels = lowbit.data.mnist("test")
    images, labels = images[:2000], labels[:2000]
    float_model, _ = lowbit.models.load("mnist-cnn")
    q = lowbit.load(out)  # skeleton rebuilt from the checkpoint's source name
    base, quant = accuracy(float_model, images, labels), accuracy(q, images, labels)
    assert quant >= base - 0.3  # full test set in benchmarks/: drop <= 0.2 points
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": images[:500].numpy()})[0]
    with torch.no_grad():
        ours = q(images[:500]).numpy()
    assert_ort_matches(logits, ours, 2 * float(q.classifier.output_scale))
    if ort_int8_exact():
        assert (logits.argmax(1) == ours.argmax(1)).mean() >= 0.998


def test_minilm_static_keeps_embeddings(tmp_path):
    from lowbit.models import embed

    model, tok = lowbit.models.load("minilm-l6")
    texts = lowbit.data.sentences("eval", 48)
    ref = embed(model, tok, texts)
    calib = [dict(tok(lowbit.data.sentences("calib", 128)[i : i + 32], padding=True, return_tensors="pt"))
             for i in range(0, 128, 32)]  # fmt: skip
    summary = lowbit.quantize_(model, lowbit.StaticW8A8(observer="mse"), calib)
    assert len(summary.quantized) == 37  # 6 layers x 6 Linear + pooler
    cos = torch.nn.functional.cosine_similarity(embed(model, tok, texts), ref)
    assert float(cos.mean()) > 0.985  # 96 sentences, 256 calibration: 0.9935 measured (mse)
    lowbit.save(model, tmp_path / "enc", tokenizer=tok)
    back = lowbit.load(tmp_path / "enc")
    batch = dict(tok(texts[:4], padding=True, return_tensors="pt"))
    with torch.no_grad():
        assert torch.equal(back(**batch).last_hidden_state, model(**batch).last_hidden_state)


def test_mnist_cnn_report_and_onnx_debug(tmp_path, capsys):
    """``lowbit report`` on a real static W8A8 checkpoint (per-class audit, layers, energy), and ``lowbit
    debug`` of its QDQ ONNX export against the float model's ONNX, one weight scale broken."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    ck, rep = tmp_path / "q", tmp_path / "rep"
    argv = ["quantize", "--model", "mnist-cnn", "--scheme", "w8a8-static", "--calib", "mnist:256",
            "--out", str(ck), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert main(["report", str(ck), "--data", "mnist:1000", "--no-speed", "--quiet", "--out", str(rep)]) == 0
    r = json.loads((rep / "report.json").read_text())
    assert r["model"]["baseline"] == "mnist-cnn" and r["quality"]["metric"] == "top-1 accuracy"
    assert r["audit"]["grouping"] == "class" and len(r["audit"]["groups"]) == 10
    assert len(r["layers"]) == 7 and all(e["output_sqnr_db"] > 25 for e in r["layers"])
    assert r["energy"]["quantized"]["total_uj"] < r["energy"]["baseline"]["total_uj"]
    capsys.readouterr()
    qdq, flt = tmp_path / "q.onnx", tmp_path / "f.onnx"
    assert main(["export", str(ck), "--out", str(qdq)]) == 0
    model, _ = lowbit.models.load("mnist-cnn")
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(flt), input_names=["input"],
                      dynamic_axes={"input": {0: "n"}}, dynamo=False)  # fmt: skip
    g = onnx.load(str(qdq))
    scales = [i for i in g.graph.initializer if i.name.startswith("features.3") and "scale" in i.name]
    broken = scales[0]
    broken.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(broken) * np.float32(100), broken.name))
    onnx.save(g, str(tmp_path / "broken.onnx"))
    capsys.readouterr()
    argv = ["debug", str(tmp_path / "broken.onnx"), "--float", str(flt), "--data", "mnist:16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "features.3" in out.split("worst")[0], out
