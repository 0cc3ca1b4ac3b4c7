"""Streaming block-by-block quantization from a Hugging Face folder: same result as in memory, resumable."""

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit import CheckpointError, Int8Dynamic, LowbitError, SmoothQuant, WeightOnly, quantize_
from lowbit.export import staging, streaming
from lowbit.export.staging import merge_safetensors
from lowbit.export.streaming import quantize_folder
from lowbit.transforms import sequential
from support import tiny_llama

GPTQ = WeightOnly(bits=4, group_size=16, method="gptq")


def _calib(seed=1, n=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (1, 16), generator=g) for _ in range(n)]


@pytest.fixture
def src(tmp_path) -> Path:
    tiny_llama().save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def _same_checkpoint(a: Path, b: Path, bytewise: bool = False) -> None:
    if bytewise:
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    meta = [json.loads((d / "quant_config.json").read_text()) for d in (a, b)]
    assert meta[0] == meta[1]


@pytest.mark.parametrize(
    "config",
    [
        WeightOnly(bits=4, group_size=16),
        GPTQ,
        WeightOnly(bits=4, group_size=16, method="awq"),
        WeightOnly(bits=4, group_size=16, method="awq+gptq"),
        SmoothQuant(),
        WeightOnly(method="hqq"),
        Int8Dynamic(),
    ],
    ids=["rtn", "gptq", "awq", "awq+gptq", "smoothquant", "hqq", "w8a8"],
)
def test_streaming_equals_in_memory(src, tmp_path, config):
    """``quantize_`` + ``lowbit.save`` and ``quantize_folder`` give the same tensors, bit for bit, and
    the same quant_config.json (both runs go through ``sequential.run_blocks``)."""
    model = tiny_llama()
    quantize_(model, config, _calib())
    lowbit.save(model, tmp_path / "mem")
    summary = quantize_folder(src, config, tmp_path / "out", _calib(), progress=False)
    assert len(summary.quantized) == 16 and summary.tied == {"lm_head": "model.embed_tokens"}
    _same_checkpoint(tmp_path / "mem", tmp_path / "out")
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "out")(ids).logits, model(ids).logits)
    assert not any(p.name.endswith(streaming.STAGE_SUFFIX) for p in tmp_path.iterdir())  # staging removed


def test_sharded_source_gives_the_same_checkpoint(src, tmp_path):
    tiny_llama().save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    quantize_folder(src, GPTQ, tmp_path / "a", _calib(), progress=False)
    quantize_folder(tmp_path / "sharded", GPTQ, tmp_path / "b", _calib(), progress=False)
    _same_checkpoint(tmp_path / "a", tmp_path / "b", bytewise=True)


def _crash_at_block(monkeypatch, index: int) -> list[str]:
    """Make ``quantize_block`` raise when it reaches block ``index``; returns the prefixes it ran."""
    real, calls = sequential.quantize_block, []

    def flaky(block, prefix, *args, **kwargs):
        calls.append(prefix)
        if prefix.endswith(f".{index}"):
            raise RuntimeError("simulated crash")
        return real(block, prefix, *args, **kwargs)

    monkeypatch.setattr(sequential, "quantize_block", flaky)
    return calls


def test_resume_after_crash_is_bitwise_identical(src, tmp_path, monkeypatch):
    quantize_folder(src, GPTQ, tmp_path / "whole", _calib(), progress=False)
    with monkeypatch.context() as mp:
        _crash_at_block(mp, 1)
        with pytest.raises(RuntimeError, match="simulated crash"):
            quantize_folder(src, GPTQ, tmp_path / "out", _calib(), progress=False)
    stage = tmp_path / f".out{streaming.STAGE_SUFFIX}"
    assert json.loads((stage / "state.json").read_text())["done"] == 1 and not (tmp_path / "out").exists()
    calls = _crash_at_block(monkeypatch, 99)
    summary = quantize_folder(src, GPTQ, tmp_path / "out", _calib(), progress=False)
    assert calls == ["model.layers.1"]  # block 0 came from the staging
    assert len(summary.quantized) == 16
    _same_checkpoint(tmp_path / "whole", tmp_path / "out", bytewise=True)


KILL_AT_BLOCK_1 = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from lowbit import WeightOnly
from lowbit.export import streaming
from lowbit.transforms import sequential
real = sequential.quantize_block
def dying(block, prefix, *a, **k):
    if prefix.endswith(".1"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(block, prefix, *a, **k)
sequential.quantize_block = dying
g = torch.Generator().manual_seed(1)
calib = [torch.randint(0, 64, (1, 16), generator=g) for _ in range(5)]
streaming.quantize_folder({src!r}, WeightOnly(bits=4, group_size=16, method="gptq"), {out!r}, calib,
                          progress=False)
"""


@pytest.mark.slow  # a fresh interpreter importing transformers: 10-20 s on 2 cores
def test_kill_9_then_resume(src, tmp_path):
    tests = str(Path(__file__).parents[1])
    code = KILL_AT_BLOCK_1.format(tests=tests, src=str(src), out=str(tmp_path / "out"))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (tmp_path / "out").exists()
    quantize_folder(src, GPTQ, tmp_path / "out", _calib(), progress=False)
    quantize_folder(src, GPTQ, tmp_path / "whole", _calib(), progress=False)
    _same_checkpoint(tmp_path / "whole", tmp_path / "out", bytewise=True)


def test_other_calibration_data_starts_over(src, tmp_path, monkeypatch):
    with monkeypatch.context() as mp:
        _crash_at_block(mp, 1)
        with pytest.raises(RuntimeError):
            quantize_folder(src, GPTQ, tmp_path / "out", _calib(seed=1), progress=False)
    with pytest.warns(UserWarning, match="another source, config, selection or calibration set"):
        quantize_folder(src, GPTQ, tmp_path / "out", _calib(seed=2), progress=False)
    quantize_folder(src, GPTQ, tmp_path / "whole", _calib(seed=2), progress=False)
    _same_checkpoint(tmp_path / "whole", tmp_path / "out", bytewise=True)


def test_existing_output_and_failed_final_write(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous output")
    with pytest.raises(LowbitError, match="already exists"):
        quantize_folder(src, GPTQ, out, _calib(), progress=False)
    with pytest.raises(LowbitError, match="not a lowbit checkpoint"):
        quantize_folder(src, GPTQ, out, _calib(), overwrite=True, progress=False)
    (out / "quant_config.json").write_text("{}")  # a (previous) checkpoint: overwrite may replace it

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr(staging, "merge_safetensors", disk_full)
        with pytest.raises(LowbitError, match="No space left on device.*run again to resume"):
            quantize_folder(src, GPTQ, out, _calib(), overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "previous output" and len(list(tmp_path.iterdir())) == 3
    calls = _crash_at_block(monkeypatch, 99)
    quantize_folder(src, GPTQ, out, _calib(), overwrite=True, progress=False)
    assert calls == [] and not (out / "keep.txt").exists()  # every block came from the staging
    assert isinstance(lowbit.load(out).model.layers[1].mlp.down_proj, lowbit.QLinear)


def test_bad_sources(src, tmp_path):
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight missing"):
        quantize_folder(src, GPTQ, tmp_path / "out", _calib(), progress=False)
    with pytest.raises(CheckpointError, match="no config.json"):
        quantize_folder(tmp_path, GPTQ, tmp_path / "out2", _calib(), progress=False)
    with pytest.raises(LowbitError, match="needs calibration data"):
        quantize_folder(src, GPTQ, tmp_path / "out3", progress=False)


def test_merge_safetensors_aligns_and_round_trips(tmp_path):
    parts = {
        "a": {"x.codes": torch.arange(7, dtype=torch.uint8), "x.scale": torch.rand(3, dtype=torch.float16)},
        "b": {"y.w": torch.rand(5, 3), "y.i": torch.arange(3, dtype=torch.int64), "y.z": torch.ones(3, 1)},
    }
    for name, tensors in parts.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    merged = tmp_path / "m.safetensors"
    merge_safetensors([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], merged, {"k": "v"}, chunk=4)
    got = load_file(str(merged))
    want = {**parts["a"], **parts["b"]}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    n = int.from_bytes(merged.read_bytes()[:8], "little")
    header = json.loads(merged.read_bytes()[8 : 8 + n])
    assert n % 8 == 0 and header["__metadata__"] == {"k": "v"}
    size = {"I64": 8, "F32": 4, "F16": 2, "U8": 1}
    assert all(v["data_offsets"][0] % size[v["dtype"]] == 0 for k, v in header.items() if k != "__metadata__")


def _llama(tied: bool, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    cfg = LlamaConfig(vocab_size=64, num_hidden_layers=2, tie_word_embeddings=tied, **sizes, **config)
    return LlamaForCausalLM(cfg).eval()


FLOAT_EMBEDDING = WeightOnly(bits=4, group_size=16, quantize_embeddings=False)


@pytest.mark.parametrize(
    "tied, config, exclude, read_whole",
    [
        (False, GPTQ, (), set()),
        (True, GPTQ, (), set()),
        (False, WeightOnly(bits=4, group_size=16, method="gptq", embedding_group_size=0), (), set()),
        (False, Int8Dynamic(), (), set()),
        (False, GPTQ, ("lm_head",), set()),  # float tables: bytes copied from the source
        (True, FLOAT_EMBEDDING, (), set()),
        (True, GPTQ, ("lm_head",), {"model.embed_tokens.weight"}),  # float head, quantized embedding
    ],
    ids=[
        "untied",
        "tied",
        "per-row-embedding",
        "w8a8",
        "float-head",
        "tied-float-embedding",
        "tied-float-head",
    ],
)
def test_tables_stream_in_row_chunks(tmp_path, monkeypatch, tied, config, exclude, read_whole):
    """Embedding and LM head read 7 rows at a time (capture: only the calibration ids' rows), not
    whole unless kept float, give the checkpoint of whole-table rounding in memory."""
    from lowbit.transforms import source, swap

    model = _llama(tied, pad_token_id=5)
    model.save_pretrained(tmp_path / "src")
    calib = _calib() if getattr(config, "needs_calib", False) else None
    mem = quantize_(model, config, calib, exclude=exclude)
    lowbit.save(model, tmp_path / "mem")
    real, read = source.Source.read, []
    monkeypatch.setattr(source.Source, "read", lambda self, keys: read.extend(keys) or real(self, keys))
    monkeypatch.setattr(swap, "CHUNK_ROWS", 7)  # 64 rows in 10 chunks
    summary = quantize_folder(
        tmp_path / "src", config, tmp_path / "out", calib, exclude=exclude, progress=False
    )
    _same_checkpoint(tmp_path / "mem", tmp_path / "out")
    assert (summary.quantized, summary.tied, summary.skipped) == (mem.quantized, mem.tied, mem.skipped)
    assert {"model.embed_tokens.weight", "lm_head.weight"} & set(read) == read_whole
