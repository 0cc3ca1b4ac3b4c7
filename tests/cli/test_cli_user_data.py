"""The user's own data through the CLI: --calib text/jsonl/images/tensors, --task ppl:FILE and
accuracy:DIR, and their bad input (one line, exit 2, nothing written)."""

import json

import numpy as np
import pytest
from PIL import Image
from tests.models.test_models_load import _tiny_tokenizer

import lowbit
from support import run_cli, tiny_llama


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    tiny_llama().save_pretrained(root / "float")
    _tiny_tokenizer().save_pretrained(root / "float")
    (root / "text.txt").write_text("hello world hello " * 200)
    lines = [json.dumps({"text": "hello world " * 30, "id": i}) for i in range(10)]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_calib_text_and_jsonl_gptq(capsys, lm_folder, tmp_path):
    for spec in (f"text:{lm_folder}/text.txt:8x32", f"jsonl:{lm_folder}/data.jsonl:text:4x32"):
        argv = ["quantize", "--model", str(lm_folder / "float"), "--scheme", "w4g32", "--method", "gptq",
                "--calib", spec, "--out", str(tmp_path / spec[:4]), "--quiet"]  # fmt: skip
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, err
        assert lowbit.load(tmp_path / spec[:4]).lowbit_config["method"] == "gptq"


def test_eval_ppl_on_users_text(capsys, lm_folder):
    code, out, err = run_cli(capsys, "eval", str(lm_folder / "float"), "--task", f"ppl:{lm_folder}/text.txt",
                             "--window", "64", "--tokens", "256", "--json", "--quiet")  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    assert r["tokens"] == 256 and r["perplexity"] > 1


@pytest.mark.parametrize(
    "calib,message",
    [
        ("jsonl:{root}/bad.jsonl:text", "bad.jsonl, line 2: not JSON"),
        ("text:{root}/empty.txt", "empty.txt is empty"),
        ("text:{root}/nope.txt", "nope.txt: no such file"),
    ],
    ids=["jsonl-not-json", "empty-text", "missing-file"],
)
def test_bad_user_calibration_exit_2(capsys, lm_folder, tmp_path, calib, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "hello"}\n{oops\n')
    (tmp_path / "empty.txt").write_text("")
    argv = ["quantize", "--model", str(lm_folder / "float"), "--scheme", "w4g32", "--method", "gptq",
            "--calib", calib.format(root=tmp_path), "--out", str(tmp_path / "o"), "--quiet"]  # fmt: skip
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def _mnist_folder(root, n=60):
    """The first ``n`` MNIST test images as PNG files in an ImageFolder layout (root/<digit>/<i>.png)."""
    from lowbit.data import vision

    images, labels = vision.mnist("test")
    codes = ((images[:n, 0] * vision.MNIST_STD + vision.MNIST_MEAN) * 255).round().clamp(0, 255)
    for i, (c, y) in enumerate(zip(codes.numpy().astype(np.uint8), labels[:n].tolist(), strict=True)):
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(c, "L").save(root / str(y) / f"{i:03d}.png")
    return images[:n], labels[:n]


@pytest.mark.slow
def test_mnist_png_folder_accuracy_and_static_calibration(capsys, tmp_path):
    from lowbit.data import user
    from lowbit.eval.accuracy import accuracy
    from lowbit.models.vision import preprocess_of

    images, labels = _mnist_folder(tmp_path / "digits")
    model, _ = lowbit.models.load("mnist-cnn")
    x, y, _ = user.image_classes(tmp_path / "digits", preprocess_of(model))
    order = [int(p.stem) for d in sorted((tmp_path / "digits").iterdir()) for p in sorted(d.iterdir())]
    assert (x - images[order]).abs().max() < 1e-5 and y.tolist() == labels[order].tolist()  # same pixels
    code, out, err = run_cli(capsys, "eval", "mnist-cnn", "--task", f"accuracy:{tmp_path}/digits", "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == pytest.approx(accuracy(model, images, labels))
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (tmp_path / "digits").rglob("*.png"):
        (flat / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    argv = ["quantize", "--model", "mnist-cnn", "--scheme", "w8a8-static", "--calib", f"images:{flat}:40",
            "--out", str(tmp_path / "q"), "--quiet"]  # fmt: skip
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    (flat / "readme.txt").write_text("x")
    argv[-2] = str(tmp_path / "q2")
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "readme.txt: not a JPEG or PNG image" in err
