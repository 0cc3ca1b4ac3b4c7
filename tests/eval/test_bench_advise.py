"""``advise`` and ``bench``: measured tables on tiny layers and a tiny Llama (speed only: random weights)."""

import copy
import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.cli.main import main
from lowbit.eval import advise as ea
from lowbit.eval import bench as eb
from lowbit.kernels.advice import FLOAT, load_cached
from lowbit.transforms import dequantize_
from support import tiny_llama


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_measure_layer_times_float_and_every_backend():
    m = nn.Sequential(nn.Linear(64, 48))
    lowbit.quantize_(m, lowbit.parse_scheme("w4g32"))
    e = ea.measure_layer(m[0], [1, 3], rounds=1, min_seconds=0.0)
    assert e["batches"] == [1, 3] and FLOAT in e["us"] and "reference" in e["us"]
    assert all(len(v) == 2 for v in e["us"].values()) and all(t > 0 for t in e["us"][FLOAT])


def test_backends_far_slower_than_float_are_cut_off(monkeypatch):
    monkeypatch.setattr(ea, "CUTOFF", 0.0)
    m = nn.Sequential(nn.Linear(64, 48))
    lowbit.quantize_(m, lowbit.parse_scheme("w8"))
    e = ea.measure_layer(m[0], [1, 2], rounds=1, min_seconds=0.0)
    assert e["us"][FLOAT][1] is not None
    assert all(v[1] is None for k, v in e["us"].items() if k != FLOAT)


def test_advise_caches_and_tables(cache, monkeypatch):
    calls = []
    real = ea.measure_shape
    monkeypatch.setattr(ea, "measure_shape", lambda *a, **k: calls.append(a) or real(*a[:4], rounds=1))
    shapes = ea.linear_shapes(tiny_llama())
    assert (32, 32) in shapes and (64, 32) in shapes and (32, 64) in shapes
    a = ea.advise(shapes[:2], ("w8", "w8a8"), (1, 2))
    assert len(calls) == 4 and len(load_cached().entries) == 4
    ea.advise(shapes[:2], ("w8", "w8a8"), (1, 2))
    assert len(calls) == 4  # cached: nothing measured again
    rows = ea.table(a, shapes[:2], ("w8", "w8a8"))
    assert len(rows) == 4 and {r["fastest"] for r in rows} <= {"fp32", "w8", "w8a8"}
    assert "| shape | batch |" in ea.format_table(rows, ("w8", "w8a8"))


def test_dequantize_gives_the_float_twin():
    q = tiny_llama()
    lowbit.quantize_(q, lowbit.parse_scheme("w4g32"))
    twin = copy.deepcopy(q)
    assert dequantize_(twin) == 16  # 14 block Linears, the embedding and the tied head
    assert twin.lm_head.weight is twin.model.embed_tokens.weight
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, q(ids).logits, rtol=1e-4, atol=1e-4)


def test_end_to_end_reports_speed_memory_and_agreement():
    f = tiny_llama()
    q = copy.deepcopy(f)
    lowbit.quantize_(q, lowbit.parse_scheme("w8"))
    r = eb.end_to_end({"fp32": f, "quantized": q}, torch.randint(0, 64, (1, 6)), new=3, rounds=1)
    assert set(r) == {"fp32", "quantized"}
    assert r["fp32"]["tokens_before_first_divergence"] == 3
    assert r["quantized"]["weights_mb"] < r["fp32"]["weights_mb"]
    assert all(v["decode_tok_s"] > 0 and v["prefill_tok_s"] > 0 for v in r.values())


def test_cli_bench_and_advise(capsys, tmp_path, cache):
    q = tiny_llama()
    lowbit.quantize_(q, lowbit.parse_scheme("w8"))
    lowbit.save(q, tmp_path / "q")
    args = ["--batches", "1", "--rounds", "1", "--quiet", "--json"]
    assert main(["bench", str(tmp_path / "q"), "--prompt", "4", "--new", "2", *args]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["scheme"] == "checkpoint" and r["layers"] and set(r["end_to_end"]) == {"fp32", "quantized"}
    assert main(["advise", str(tmp_path / "q"), "--schemes", "w8", *args]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [row["batch"] for row in r["table"]] == [1] * 4  # q/o, k/v, gate/up/head, down shapes


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "{q}", "--scheme", "w8"], "already quantized"),
        (["bench", "{q}", "--new", "1"], "--new"),
        (["advise", "{q}", "--schemes", "w4x"], "unknown scheme"),
    ],
    ids=["scheme-on-checkpoint", "too-few-tokens", "bad-scheme"],
)
def test_cli_bad_input(capsys, tmp_path, cache, argv, message):
    q = tiny_llama()
    lowbit.quantize_(q, lowbit.parse_scheme("w8"))
    lowbit.save(q, tmp_path / "q")
    code = main([a.replace("{q}", str(tmp_path / "q")) for a in argv] + ["--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
