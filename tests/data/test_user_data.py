"""The user's own data (lowbit.data.user): specs, text and JSONL, image folders, safetensors batches, and
their bad input, each refused with the file (and line) named."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tests.models.test_models_load import _tiny_tokenizer

from lowbit import LowbitError
from lowbit.data import user
from lowbit.data.user import Preprocess

PRE = Preprocess(3, 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _png(path, size=(12, 10), mode="RGB", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3 if mode == "RGB" else 1)[: 3 if mode == "RGB" else 2],
                            value, dtype=np.uint8), mode).save(path)  # fmt: skip
    return path


def test_parse_specs(tmp_path):
    (tmp_path / "t.txt").write_text("hello")
    (tmp_path / "d").mkdir()
    assert user.parse(f"text:{tmp_path}/t.txt:4x16") == user.UserSpec("text", tmp_path / "t.txt", None, 4, 16)
    assert user.parse(f"jsonl:{tmp_path}/t.txt:body").field == "body"
    assert user.parse(f"images:{tmp_path}/d:5").count == 5
    bad_specs = [(f"text:{tmp_path}/missing.txt", "no such file"),
                 (f"images:{tmp_path}/t.txt", "no such folder"),
                 (f"jsonl:{tmp_path}/t.txt", "jsonl:FILE:FIELD"), ("text:", "bad spec")]  # fmt: skip
    for bad, msg in bad_specs:
        with pytest.raises(LowbitError, match=msg):
            user.parse(bad)


def test_text_samples_and_empty_file(tmp_path):
    tok = _tiny_tokenizer()
    samples = user.text_samples(tok, "hello world " * 20, 3, 8, "t.txt")
    assert [tuple(s.shape) for s in samples] == [(1, 8)] * 3 and int(samples[0][0, 0]) == 1
    with pytest.warns(UserWarning, match="make 5 samples of 8, not 9"):
        assert len(user.text_samples(tok, "hello world " * 20, 9, 8, "t.txt")) == 5
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(LowbitError, match="is empty"):
        user.calibration(f"text:{tmp_path}/e.txt", tok)
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LowbitError, match="not UTF-8"):
        user.calibration(f"text:{tmp_path}/b.txt", tok)


def test_jsonl_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "hello world"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    assert user.jsonl_text(path, "text") == "hello world\n\nworld"
    path.write_text(json.dumps({"text": "a"}) + "\n{not json\n")
    with pytest.raises(LowbitError, match=r"d.jsonl, line 2: not JSON"):
        user.jsonl_text(path, "text")
    path.write_text(json.dumps({"body": "a"}) + "\n")
    with pytest.raises(LowbitError, match="line 1: no string field 'text'"):
        user.jsonl_text(path, "text")


def test_image_folder_mixed_sizes_and_non_images(tmp_path):
    _png(tmp_path / "a.png", (12, 10), value=255)
    _png(tmp_path / "b.png", (30, 40), value=0)
    x = user.image_folder(tmp_path, PRE)
    assert x.shape == (2, 3, 8, 8)
    assert torch.allclose(x[0], torch.full((3, 8, 8), 2.0)) and torch.allclose(
        x[1], torch.full((3, 8, 8), -2.0)
    )
    grey = user.load_image(tmp_path / "a.png", Preprocess(1, 4, (0.0,), (1.0,)))
    assert grey.shape == (1, 4, 4) and float(grey.max()) == 1.0
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(LowbitError, match="notes.txt: not a JPEG or PNG"):
        user.image_folder(tmp_path, PRE)
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(LowbitError, match="c.png: cannot decode"):
        user.image_folder(tmp_path, PRE)


def test_image_classes_numbered_and_named(tmp_path):
    for c in ("3", "7"):
        _png(tmp_path / "num" / c / "x.png")
    _, labels, names = user.image_classes(tmp_path / "num", PRE)
    assert labels.tolist() == [3, 7] and names == ["3", "7"]
    for c in ("cat", "dog"):
        _png(tmp_path / "named" / c / "x.png")
    assert user.image_classes(tmp_path / "named", PRE)[1].tolist() == [0, 1]
    with pytest.raises(LowbitError, match="no class folders"):
        user.image_classes(tmp_path / "num" / "3", PRE)


def test_tensors_file(tmp_path):
    save_file({"b": torch.ones(2, 3), "a": torch.zeros(4, 3)}, str(tmp_path / "t.safetensors"))
    batches = user.calibration(f"tensors:{tmp_path}/t.safetensors")
    assert [tuple(b.shape) for b in batches] == [(4, 3), (2, 3)]
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(LowbitError, match="not a readable safetensors"):
        user.calibration(f"tensors:{tmp_path}/bad.safetensors")
