"""``lowbit autotune``: bad budgets and candidates are one line and exit 2 before anything loads; on
SmolLM2 (slow) it saves a mixed model with its plan that meets the budget and evaluates it."""

import json

import pytest
import torch

import lowbit
from support import run_cli as _run

BASE = ["autotune", "--model", "smollm2-135m", "--calib", "wiki:2x64"]


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "exactly one of --max-size, --bits, --max-ppl-increase, --max-latency"),
        (["--bits", "3", "--max-size", "10MB"], "exactly one of"),
        (["--max-size", "ten"], "bad size 'ten'"),
        (["--max-ppl-increase", "five"], "bad --max-ppl-increase"),
        (["--bits", "3", "--candidates", "w3g64,int4"], "bad candidate 'int4'"),
        (["--bits", "3", "--base", "w8a8"], "does not apply to scheme 'w8a8'"),
        (["--bits", "-1"], "budget bits must be a positive number"),
        (["--max-latency", "fast"], "bad latency 'fast'; write e.g. 8ms or 800us"),
        (["--max-latency", "8ms", "--bits", "4"], "exactly one of"),
        (["--bits", "4", "--candidates", "nf4g64", "--method", "hqq"], "method hqq fits integer grids only"),
    ],
    ids=[
        "no-budget",
        "two-budgets",
        "bad-size",
        "bad-increase",
        "bad-candidate",
        "bad-base",
        "negative",
        "bad-latency",
        "latency-and-bits",
        "hqq-nf4",
    ],  # fmt: skip
)
def test_bad_input_exit_2_one_line(capsys, tmp_path, extra, message):
    code, _, err = _run(capsys, *BASE, "--out", str(tmp_path / "o"), *extra)
    assert code == 2, err
    assert err.startswith("lowbit: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_autotune_smollm2_meets_the_budget(capsys, tmp_path, smollm2):
    out = tmp_path / "mixed"
    argv = [*BASE, "--bits", "5", "--candidates", "w4g128,w8", "--method", "rtn", "--out", str(out)]
    argv += ["--exclude", "lm_head", "--exclude", "model.embed_tokens", "--json"]
    code, stdout, err = _run(capsys, *argv)
    assert code == 0, err
    result = json.loads(stdout)
    plan = json.loads((out / "plan.json").read_text())
    assert result["chosen"]["bits_per_weight"] <= 5.0 and plan["bits_per_weight"] <= 5.0
    assert set(plan["counts"]) == {"w4g128", "w8"} and len(plan["layers"]) == 210
    model = lowbit.load(out)
    assert type(model.model.embed_tokens) is torch.nn.Embedding  # excluded from the plan: stays float
    for name, entry in list(plan["layers"].items())[:20]:
        assert model.get_submodule(name).spec.fmt.bits == int(entry["format"][1])
    assert 21.0 < result["chosen"]["perplexity"] < 30.0
