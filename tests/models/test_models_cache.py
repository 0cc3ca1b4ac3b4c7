"""The fp32 GGUF cache: built atomically, reused, rebuilt when corrupted or when the source changes.

Fast tests replace the (20 s) transformers dequantization by saving a tiny Llama; the slow test runs
the real thing on the bundled SmolLM2.
"""

import json
import os
import time

import pytest
import torch

from lowbit.models import cache, load, loader
from lowbit.models.cache import MANIFEST, gguf_key
from support import tiny_llama


@pytest.fixture
def fake_dequantize(monkeypatch, tmp_path):
    """Replace GGUF dequantization by a tiny Llama; returns the list of GGUF files it was called with."""
    calls = []

    def fake(gguf, out, progress):
        calls.append(gguf)
        tiny_llama().save_pretrained(out)

    monkeypatch.setattr(loader, "_dequantize_into", fake)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return calls


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def _leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_gguf_cache_built_once_and_reused(fake_dequantize, gguf, tmp_path):
    root = tmp_path / "cache"
    model, tok = load(gguf, progress=False)
    entry = root / gguf_key(gguf)
    assert fake_dequantize == [gguf] and tok is None
    assert sorted(p.name for p in root.iterdir()) == [entry.name]  # no temp folders left
    record = json.loads((entry / MANIFEST).read_text())
    assert record["source"]["size"] == 64 and record["files"]["model.safetensors"] > 0
    model2, _ = load(str(gguf), progress=False)
    assert len(fake_dequantize) == 1
    torch.testing.assert_close(model2.state_dict(), model.state_dict(), rtol=0, atol=0)
    os.utime(gguf, ns=(1, 1))  # same content, new mtime: same entry, no rebuild
    load(gguf, progress=False)
    assert len(fake_dequantize) == 1
    gguf.write_bytes(b"GGUF" + bytes([1]) + bytes(59))  # new content: a new cache key, so a new entry
    load(gguf, progress=False)
    assert len(fake_dequantize) == 2 and len(list(root.iterdir())) == 2


def test_bundled_entry_name_and_cache_dir_arg(fake_dequantize, tmp_path):
    load("smollm2-135m", cache_dir=tmp_path / "arg", progress=False)
    assert (tmp_path / "arg" / "smollm2-135m" / "model.safetensors").is_file()
    assert not (tmp_path / "cache").exists()


def test_killed_build_leaves_no_entry(monkeypatch, gguf, tmp_path):
    def dies(gguf, out, progress):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "_dequantize_into", dies)
    root = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        load(gguf, cache_dir=root, progress=False)
    assert list(root.iterdir()) == []


def test_stale_temp_folders_removed(fake_dequantize, gguf, tmp_path):
    root = tmp_path / "cache"
    key = gguf_key(gguf)
    stale, fresh = root / f".{key}.tmp-old", root / f".{key}.tmp-busy"
    for d in (stale, fresh):
        d.mkdir(parents=True)
    os.utime(stale, (time.time() - 2 * cache.STALE_TMP_SECONDS,) * 2)
    load(gguf, progress=False)
    assert _leftovers(root) == [fresh.name]  # a recent one may be another process's build in progress


@pytest.mark.parametrize("damage", ["truncate", "delete_config", "manifest", "source_changed"])
def test_unusable_cache_is_rebuilt(fake_dequantize, tmp_path, damage):
    root = tmp_path / "cache"
    load("smollm2-135m", progress=False)
    entry = root / "smollm2-135m"
    if damage == "truncate":
        weights = entry / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "delete_config":
        (entry / "config.json").unlink()
    elif damage == "manifest":
        (entry / MANIFEST).write_text("{not json")
    else:
        record = json.loads((entry / MANIFEST).read_text())
        record["source"]["size"] += 1
        (entry / MANIFEST).write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=r"rebuilding model cache .*smollm2-135m"):
        model, _ = load("smollm2-135m", progress=False)
    assert len(fake_dequantize) == 2
    assert cache.cache_problem(entry, json.loads((entry / MANIFEST).read_text())["source"]) is None
    assert _leftovers(root) == []
    torch.testing.assert_close(model.state_dict(), tiny_llama().state_dict(), rtol=0, atol=0)


def test_cache_problem_names_truncated_file(fake_dequantize, gguf, tmp_path):
    load(gguf, progress=False)
    entry = tmp_path / "cache" / gguf_key(gguf)
    source = cache.source_stamp(gguf)
    assert cache.cache_problem(entry, source) is None
    weights = entry / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1)
    assert str(weights) in cache.cache_problem(entry, source)


@pytest.mark.slow
def test_real_gguf_first_load_then_cached(tmp_path, monkeypatch, smollm2):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    model, tok = load("smollm2-135m", progress=False)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    model2, tok2 = load("smollm2-135m", progress=False)
    cached = time.perf_counter() - t0
    print(f"\nSmolLM2 first load {first:.1f} s, cached load {cached:.1f} s")
    entry = tmp_path / "smollm2-135m"
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST} <= {
        p.name for p in entry.iterdir()
    }
    assert _leftovers(tmp_path) == []
    assert cached < first / 3
    assert not model2.training and model2.dtype == torch.float32
    assert model2.lm_head.weight is model2.model.embed_tokens.weight
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())
    torch.testing.assert_close(model2.state_dict(), smollm2[0].state_dict(), rtol=0, atol=0)
    assert tok2("Hello world")["input_ids"] == smollm2[1]("Hello world")["input_ids"]
