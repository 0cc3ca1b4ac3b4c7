"""The CLI: bad input is one line on stderr and exit code 2, with nothing written."""

import json

import pytest
import torch

import lowbit
from support import run_cli as _run


@pytest.mark.parametrize(
    "argv,message",
    [
        (["quantize", "--model", "no-such-model", "--scheme", "w4g128", "--out", "{tmp}/o"], "unknown model"),
        (["quantize", "--model", "smollm2-135m", "--scheme", "w4x", "--out", "{tmp}/o"], "unknown scheme"),
        (["eval", "{tmp}/missing", "--task", "wiki-ppl"], "unknown model"),
        (["eval", "smollm2-135m", "--task", "imagenet"], "unknown task"),
    ],
    ids=["unknown-model", "unknown-scheme", "missing-folder", "unknown-task"],
)
def test_bad_input_exit_2_one_line(capsys, tmp_path, argv, message):
    code, out, err = _run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert err.startswith("lowbit: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_existing_output_refused(capsys, tmp_path):
    (tmp_path / "o").mkdir()
    code, _, err = _run(capsys, "quantize", "--model", "x", "--scheme", "w8", "--out", str(tmp_path / "o"))
    assert code == 2 and "already exists" in err


def test_corrupted_checkpoint(capsys, tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    lowbit.quantize_(m, lowbit.WeightOnly(bits=8, group_size=None))
    lowbit.save(m, tmp_path / "q")
    (tmp_path / "q" / "quant_config.json").write_text(json.dumps({"format": "lowbit", "format_version": 7}))
    code, _, err = _run(capsys, "eval", str(tmp_path / "q"))
    assert code == 2 and "format version 7 is newer" in err


@pytest.mark.slow
def test_quantize_then_eval_smollm2(capsys, tmp_path, smollm2):
    out = str(tmp_path / "w4")
    code, text, _ = _run(
        capsys, "quantize", "--model", "smollm2-135m", "--scheme", "w4g128", "--out", out, "--quiet", "--json"
    )
    assert (
        code == 0 and json.loads(text)["quantized_modules"] == 212
    )  # 30 blocks x 7 Linear + embedding + tied LM head
    code, text, _ = _run(capsys, "eval", out, "--task", "wiki-ppl", "--tokens", "1024", "--quiet", "--json")
    result = json.loads(text)
    assert code == 0 and 5 < result["perplexity"] < 100


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["quantize", "--model", "x", "--scheme", "w8", "--observer", "kl", "--out", "{tmp}/o"],
            "--observer applies",
        ),
        (
            [
                "quantize",
                "--model",
                "x",
                "--scheme",
                "w8a8-static",
                "--calib",
                "imagenet:5",
                "--out",
                "{tmp}/o",
            ],
            "bad --calib",
        ),
        (
            [
                "quantize",
                "--model",
                "x",
                "--scheme",
                "w8a8-static",
                "--calib",
                "photos:0",
                "--out",
                "{tmp}/o",
            ],
            "bad --calib",
        ),
        (["export", "{tmp}/missing", "--out", "{tmp}/o"], "unknown model"),
        (["export", "{tmp}/missing", "--format", "coreml", "--out", "{tmp}/o"], "unknown export format"),
    ],
    ids=["observer-needs-static", "unknown-calib-source", "zero-calib", "export-missing", "export-format"],
)
def test_static_and_export_bad_input(capsys, tmp_path, argv, message):
    code, _, err = _run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_export_needs_a_rebuildable_checkpoint(capsys, tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    lowbit.save(m, tmp_path / "f")
    code, _, err = _run(capsys, "export", str(tmp_path / "f"), "--out", str(tmp_path / "o"))
    assert code == 2 and "config.json: missing" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--scheme", "w4g128", "--method", "gptq"], "needs calibration data"),
        (["--scheme", "w4g128", "--method", "magic"], "unknown method 'magic'; known: rtn, hqq"),
        (["--scheme", "w4g128", "--method", "awq", "--calib", "wiki:12"], "bad --calib"),
        (["--scheme", "w4g128", "--method", "gptq", "--calib", "wiki:0x512"], "bad --calib"),
        (["--scheme", "w4g128", "--method", "smoothquant", "--calib", "wiki:4x64"], "does not apply"),
        (["--scheme", "w8a8-static", "--calib", "photos:4", "--streaming"], "--streaming supports"),
        (["--scheme", "w8a8-static"], "w8a8-static with method rtn needs calibration data"),
    ],
    ids=[
        "gptq-no-calib",
        "unknown-method",
        "wiki-no-length",
        "wiki-zero",
        "sq-w4",
        "streaming-static",
        "static-no-calib",
    ],
)
def test_method_bad_input(capsys, tmp_path, extra, message):
    code, _, err = _run(capsys, "quantize", "--model", "x", *extra, "--out", str(tmp_path / "o"))
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_streaming_hqq_on_a_folder(capsys, tmp_path):
    from support import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "src")
    out = str(tmp_path / "q")
    argv = ["quantize", "--model", str(tmp_path / "src"), "--scheme", "w4g16", "--method", "hqq"]
    code, text, err = _run(capsys, *argv, "--streaming", "--out", out, "--quiet", "--json")
    assert code == 0, err
    result = json.loads(text)
    assert result["quantized_modules"] == 16 and result["method"] == "hqq" and result["uncalibrated"] == {}
    assert lowbit.load(out).lowbit_config["method"] == "hqq"


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["--scheme", "w4g128", "--method", "gptq", "--calib", "wiki:8x256"],
        ["--scheme", "w8a8", "--method", "smoothquant", "--calib", "wiki:8x256", "--streaming"],
    ],
    ids=["gptq", "smoothquant-streaming"],
)
def test_quantize_with_method_smollm2(capsys, tmp_path, smollm2, extra):
    out = str(tmp_path / "q")
    argv = ["quantize", "--model", "smollm2-135m", *extra, "--out", out, "--quiet", "--json"]
    code, text, err = _run(capsys, *argv)
    assert code == 0, err
    assert json.loads(text)["quantized_modules"] == 212  # 30 blocks x 7 Linear + embedding + tied LM head
    code, text, _ = _run(capsys, "eval", out, "--task", "wiki-ppl", "--tokens", "1024", "--quiet", "--json")
    assert code == 0 and 5 < json.loads(text)["perplexity"] < 60
