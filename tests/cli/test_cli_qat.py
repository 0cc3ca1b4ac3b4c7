"""``lowbit quantize --method qat`` and ``lowbit eval --task mnist|fashion-mnist``: bad input is one line and
exit code 2 with nothing written; a small real run trains, saves, evaluates and resumes."""

import functools
import json

import pytest

import lowbit
import lowbit.qat
from lowbit.training import checkpoint_folder
from support import run_cli as _run


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--scheme", "w9a4", "--calib", "mnist:256"], "unknown QAT scheme"),
        (["--scheme", "w4a9", "--calib", "mnist:256"], "activation bits must be 1..8"),
        (["--scheme", "w4a4"], "needs training data"),
        (["--scheme", "w4a4", "--calib", "wiki:4x16"], "trains vision models"),
        (["--scheme", "w4a4", "--calib", "mnist:256", "--streaming"], "takes none of"),
        (["--scheme", "w4g16a4", "--calib", "mnist:256"], "group-wise weights need float activations"),
        (["--scheme", "w4a4", "--calib", "mnist:256", "--steps", "0"], "must be positive"),
        (["--scheme", "w4a4", "--calib", "mnist:256", "--lr", "-1"], "lr must be a positive"),
    ],
    ids=["weight-bits", "act-bits", "no-data", "text-data", "streaming", "group-and-act", "steps", "lr"],
)
def test_qat_bad_input(capsys, tmp_path, extra, message):
    argv = ["quantize", "--model", "mnist-cnn", "--method", "qat", "--out", str(tmp_path / "o"), *extra]
    code, _, err = _run(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_eval_unknown_task_lists_the_vision_tasks(capsys, tmp_path):
    code, _, err = _run(capsys, "eval", str(tmp_path), "--task", "cifar10")
    assert code == 2 and "mnist, fashion-mnist, photos" in err


@pytest.mark.slow
def test_qat_cli_trains_saves_evaluates_and_resumes(capsys, tmp_path, monkeypatch):
    """A run stopped after its first checkpoint resumes there when the same command runs again."""
    import lowbit.qat.trainer as train_mod

    out = tmp_path / "q"
    argv = ["quantize", "--model", "mnist-cnn", "--method", "qat", "--scheme", "w4a4",
            "--calib", "mnist:1024", "--steps", "12", "--out", str(out), "--quiet", "--json"]  # fmt: skip
    real_step, calls = train_mod._step, []

    def dying_step(*args):
        calls.append(1)
        if len(calls) > 7:  # after the step-5 checkpoint (every 5 steps, set below; the CLI keeps 200)
            raise lowbit.LowbitError("simulated crash")
        return real_step(*args)

    monkeypatch.setattr(train_mod, "_step", dying_step)
    monkeypatch.setattr(lowbit.qat, "TrainOptions", functools.partial(train_mod.TrainOptions, every=5))
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "simulated crash" in err
    assert not out.exists() and (checkpoint_folder(out) / train_mod.CHECKPOINT).is_file()
    monkeypatch.setattr(train_mod, "_step", real_step)
    code, stdout, _ = _run(capsys, *argv)
    assert code == 0
    stats = json.loads(stdout)
    assert stats["resumed_from_step"] == 5 and stats["steps"] == 12 and stats["quantized_modules"] == 7
    assert not checkpoint_folder(out).exists()  # removed once the model is saved
    code, stdout, _ = _run(capsys, "eval", str(out), "--task", "mnist", "--json")
    result = json.loads(stdout)
    # 12 steps from the step-0 (PTQ) W4A4 model: measured 98.9% on the 10,000 test images
    assert code == 0 and result["accuracy"] > 97.0 and result["images"] == 10000
    q = lowbit.load(out)
    assert type(q.classifier).__name__ == "QStaticLinear" and q.classifier.act_spec.format == "uint4"


@pytest.fixture
def tiny_lm(tmp_path):
    """A tiny Llama folder with SmolLM2's tokenizer (its 49152-token vocabulary), so ``--calib wiki:NxL``
    and ``lowbit eval --task wiki-ppl`` run on it in seconds."""
    import shutil

    from lowbit.models import cached_folder
    from support import tiny_llama

    tiny_llama(vocab=49152).save_pretrained(tmp_path / "lm")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(cached_folder("smollm2-135m", progress=False) / name, tmp_path / "lm" / name)
    return tmp_path / "lm"


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_decoder_qat_quantizes_saves_and_evaluates(capsys, tmp_path, tiny_lm, streaming):
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(tiny_lm), "--method", "qat", "--scheme", "w3g16",
            "--calib", "wiki:4x32", "--exclude", "lm_head", "--exclude", "model.embed_tokens",
            "--epochs", "2", "--batch-size", "2", "--out", str(out), "--quiet", "--json",
            *(["--streaming"] if streaming else [])]  # fmt: skip
    code, stdout, err = _run(capsys, *argv)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["method"] == "qat" and result["quantized_modules"] == 14
    assert set(result["trained"]) == {"model.layers.0", "model.layers.1"}
    config = lowbit.load(out).lowbit_config
    assert (config["method"], config["train_epochs"], config["train_batch"]) == ("qat", 2, 2)
    code, stdout, _ = _run(capsys, "eval", str(out), "--tokens", "256", "--window", "64", "--quiet", "--json")
    assert code == 0 and json.loads(stdout)["perplexity"] > 1


@pytest.mark.parametrize(
    "extra,message",
    [
        (["x", "w3g64", "wiki:4x32", "--steps", "5"], "takes --epochs"),
        (["x", "w3g64", "wiki:4x32", "--distributed"], "takes neither --distributed"),
        (["mnist-cnn", "w4a4", "mnist:64", "--epochs", "2"], "--epochs applies"),
        (["x", "w3g64", "wiki:4x32", "--epochs", "0"], "train_epochs must be a positive"),
    ],
    ids=["steps", "distributed", "epochs-on-cnn", "epochs-zero"],
)
def test_decoder_qat_bad_input(capsys, tmp_path, extra, message):
    model, scheme, calib, *rest = extra
    argv = ["quantize", "--method", "qat", "--model", model, "--scheme", scheme, "--calib", calib, *rest]
    code, _, err = _run(capsys, *argv, "--out", str(tmp_path / "o"))
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
