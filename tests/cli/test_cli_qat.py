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
