"""save/load: bit-identical round trips, atomic writes, and one clear error per kind of bad checkpoint."""

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit import CheckpointError, FormatVersionError, LowbitError, WeightOnly, quantize_
from lowbit.export import checkpoint
from lowbit.export.validate import config_digest
from support import tiny_llama


@pytest.fixture
def quantized(tmp_path):
    m = tiny_llama(vocab=256, hidden=96, intermediate=160)
    quantize_(m, WeightOnly(bits=4, group_size=64))
    return m


def _files(folder):
    return sorted(p.name for p in folder.parent.iterdir())


def test_hf_round_trip_is_bit_identical(quantized, tmp_path):
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        before = quantized(ids).logits
    lowbit.save(quantized, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.equal(before, after)
    assert loaded.lm_head.qweight is loaded.model.embed_tokens.qweight  # tie survives, stored once
    meta = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert meta["format_version"] == checkpoint.FORMAT_VERSION
    assert meta["aliases"] == {
        "lm_head.qweight": "model.embed_tokens.qweight",
        "lm_head.scale": "model.embed_tokens.scale",
        "lm_head.zero_point": "model.embed_tokens.zero_point",
    }
    assert meta["config"]["type"] == "WeightOnly"


def test_load_into_given_skeleton(tmp_path):
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    quantize_(m, WeightOnly(bits=3, group_size=16))
    x = torch.randn(4, 64)
    lowbit.save(m, tmp_path / "q")
    skeleton = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    assert torch.equal(lowbit.load(tmp_path / "q", model=skeleton)(x), m(x))


def test_existing_output_is_never_touched(quantized, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LowbitError, match="already exists"):
        lowbit.save(quantized, out)
    with pytest.raises(LowbitError, match="not a lowbit checkpoint"):
        lowbit.save(quantized, out, overwrite=True)  # overwrite replaces checkpoints only
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    lowbit.save(quantized, out, overwrite=True)  # an empty folder
    lowbit.save(quantized, out, overwrite=True)  # a checkpoint
    assert (out / "quant_config.json").exists()
    assert _files(out) == ["q"]  # no temp or old folders left


def test_interrupted_save_leaves_nothing(quantized, tmp_path, monkeypatch):
    def boom(*a, **k):
        (tmp_path / "partial-marker").write_text("")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lowbit.save(quantized, tmp_path / "q")
    assert _files(tmp_path / "q") == ["partial-marker"]


def test_interrupted_overwrite_keeps_previous(quantized, tmp_path, monkeypatch):
    lowbit.save(quantized, tmp_path / "q")
    before = (tmp_path / "q" / "model.safetensors").read_bytes()
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        lowbit.save(quantized, tmp_path / "q", overwrite=True)
    assert (tmp_path / "q" / "model.safetensors").read_bytes() == before
    assert _files(tmp_path / "q") == ["q"]


@pytest.fixture
def saved(quantized, tmp_path):
    return lowbit.save(quantized, tmp_path / "q")


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        lowbit.load(tmp_path / "nope")


def test_missing_quant_config(saved):
    (saved / "quant_config.json").unlink()
    with pytest.raises(CheckpointError, match="quant_config.json: missing"):
        lowbit.load(saved)


def test_missing_safetensors(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        lowbit.load(saved)


def test_truncated_safetensors(saved):
    p = saved / "model.safetensors"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable or corrupted"):
        lowbit.load(saved)


def _edit_meta(folder, fn):
    """Edit quant_config.json and re-sign it (config_sha256), so the structural checks must catch it."""
    p = folder / "quant_config.json"
    meta = json.loads(p.read_text())
    fn(meta)
    meta["config_sha256"] = config_digest(meta)
    p.write_text(json.dumps(meta))


def test_newer_format_version(saved):
    _edit_meta(saved, lambda m: m.update(format_version=99))
    with pytest.raises(FormatVersionError, match="format version 99 is newer"):
        lowbit.load(saved)


def test_not_json(saved):
    (saved / "quant_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        lowbit.load(saved)


def test_shape_mismatch_names_tensor(saved):
    def regroup(meta):
        meta["modules"]["model.layers.0.mlp.up_proj"]["spec"]["granularity"]["size"] = 32

    _edit_meta(saved, regroup)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.scale has shape"):
        lowbit.load(saved)


def test_unknown_module(saved):
    _edit_meta(saved, lambda m: m["modules"].update({"model.nope": m["modules"]["lm_head"]}))
    with pytest.raises(CheckpointError, match="module model.nope not in the model"):
        lowbit.load(saved)


def test_missing_hf_config_asks_for_skeleton(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="pass model="):
        lowbit.load(saved)
