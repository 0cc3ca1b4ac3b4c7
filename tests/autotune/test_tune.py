"""``tune`` on a tiny Llama: plans meet their budgets, apply through quantize_, save and load; bad budgets."""

import json

import pytest
import torch

import lowbit
from lowbit.autotune import Budget, choose, sensitivity_table, tune
from lowbit.autotune.workflow import plan_record
from lowbit.core.errors import LowbitError
from lowbit.transforms.schemes import parse_scheme
from support import tiny_llama

CANDS = ["w2g16", "w4g16", "w8"]


def _calib(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (1, 16), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def table():
    return sensitivity_table(tiny_llama(), _calib(), CANDS, exclude=["lm_head"])


def test_table_covers_every_decoder_linear(table):
    assert len(table.names) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert all(len(o) == 3 for o in table.options)
    assert all(c[0] < c[1] < c[2] for c in table.costs)  # w2g16 < w4g16 < w8 on these shapes


@pytest.mark.parametrize("bits", [3.6, 4.5, 6.0, 9.0])
def test_plan_meets_a_bits_budget(table, bits):
    plan = choose(table, Budget(bits=bits))
    assert plan.bits_per_weight <= bits
    assert set(plan.config.layers) == set(table.names)


def test_more_bytes_never_predict_more_loss(table):
    losses = [choose(table, Budget(bits=b)).predicted_loss for b in (3.6, 4.0, 5.0, 6.0, 7.0, 9.0)]
    assert losses == sorted(losses, reverse=True)


def test_plan_applies_saves_and_loads(table, tmp_path):
    plan = choose(table, Budget(bits=3.5))
    model = tiny_llama()
    lowbit.quantize_(model, plan.config, exclude=["lm_head", "model.embed_tokens"])
    for name, cand in plan.layers.items():
        assert model.get_submodule(name).spec == cand.spec(plan.config.scale_dtype)
    stored = sum(
        model.get_submodule(n).qweight.nbytes + model.get_submodule(n).scale.nbytes * 3 // 2
        for n in plan.layers
    )
    assert stored == plan.bytes
    lowbit.save(model, tmp_path / "m")
    loaded = lowbit.load(tmp_path / "m")
    ids = _calib(1)[0]
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    (tmp_path / "plan.json").write_text(json.dumps(plan_record(plan)))
    assert parse_scheme(f"plan:{tmp_path / 'plan.json'}") == plan.config


def test_loss_budget_picks_the_cheapest_plan_within_it(table):
    rich = choose(table, Budget(bits=9.0))
    loose = choose(table, Budget(max_loss=rich.predicted_loss * 4 + 1e-9))
    assert loose.predicted_loss <= rich.predicted_loss * 4 + 1e-9 and loose.bytes <= rich.bytes


def test_unreachable_budgets_say_what_is_reachable(table):
    with pytest.raises(LowbitError, match=r"smallest reachable is \d+ bytes \(3\.500 bits per weight"):
        choose(table, Budget(bits=1.0))
    with pytest.raises(LowbitError, match="least reachable"):
        choose(table, Budget(max_loss=1e-30))
    for bad in ({}, {"bits": 3.0, "max_bytes": 10}, {"bits": -1.0}, {"max_loss": float("nan")}):
        with pytest.raises(LowbitError, match="budget"):
            Budget(**bad)


def test_tied_and_unfitting_layers_follow_the_base():
    plan = tune(tiny_llama(), _calib(), Budget(bits=5.0), candidates=["w4g64"])
    assert "lm_head" in plan.left_to_base and "shared" in plan.left_to_base["lm_head"]
    assert "no candidate fits" in plan.left_to_base["model.layers.0.self_attn.q_proj"]  # 32 columns
    assert set(plan.layers) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}


def test_nothing_to_plan_is_an_error():
    with pytest.raises(LowbitError, match="no Linear or Conv2d layer to plan"):
        tune(tiny_llama(), _calib(), Budget(bits=4.0), include=["nothing.*"])


def test_bad_plan_files_are_refused(tmp_path):
    with pytest.raises(LowbitError, match="not a readable JSON config"):
        parse_scheme(f"plan:{tmp_path / 'missing.json'}")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(LowbitError, match="expected a JSON object"):
        parse_scheme(f"plan:{tmp_path / 'list.json'}")
    (tmp_path / "odd.json").write_text(
        json.dumps({"config": {"type": "WeightOnly", "layers": {"x": {"bits": 9}}}})
    )
    with pytest.raises(LowbitError, match="bits must be an integer 2..8"):
        parse_scheme(f"plan:{tmp_path / 'odd.json'}")
    (tmp_path / "fmt.json").write_text(
        json.dumps({"config": {"type": "WeightOnly", "layers": {"x": {"format": "nf3"}}}})
    )
    with pytest.raises(LowbitError, match=r"layers\['x'\]: unknown format 'nf3'; known: int, nf4"):
        parse_scheme(f"plan:{tmp_path / 'fmt.json'}")


def test_measured_sensitivity_is_the_one_layer_loss_and_plans_like_fisher(table):
    model = tiny_llama()
    measured = sensitivity_table(model, _calib(), CANDS, exclude=["lm_head"], measure="measured")
    assert measured.names == table.names and measured.costs == table.costs
    assert all(v >= 0.0 for row in measured.losses for v in row)
    layer = table.names[3]
    one = lowbit.autotune.one_layer_losses(
        model, _calib(), lowbit.autotune.sensitivity.lm_loss, {layer: model.get_submodule(layer)},
        lowbit.autotune.parse_candidates("w2g16")[0],
    )[layer]  # fmt: skip
    assert measured.losses[3][0] == pytest.approx(max(one, 0.0), rel=1e-5)
    plan = choose(measured, Budget(bits=4.5))
    assert plan.bits_per_weight <= 4.5
    with pytest.raises(LowbitError, match="unknown sensitivity measure 'hessian'; known: fisher, measured"):
        sensitivity_table(model, _calib(), CANDS, measure="hessian")


def test_scale_only_candidates_plan_and_apply(tmp_path):
    model = tiny_llama()
    t = sensitivity_table(model, _calib(), ["nf4g16", "w2g16", "fp8"], exclude=["lm_head"])
    plan = choose(t, Budget(bits=5.0))
    assert set(plan.counts()) <= {"nf4g16", "w2g16", "fp8"} and plan.bits_per_weight <= 5.0
    lowbit.quantize_(model, plan.config)
    formats = {m.spec.format for m in model.modules() if isinstance(m, lowbit.QLinear)}
    assert formats - {"uint4"} <= {"nf4", "uint2", "fp8_e4m3"}
    with pytest.raises(LowbitError, match="method hqq fits integer grids only; candidates nf4g16"):
        sensitivity_table(model, _calib(), ["nf4g16"], base=lowbit.WeightOnly(method="hqq"))


def _advice_for(table, us_of):
    """An Advice holding ``us_of(candidate name)`` microseconds for every planned shape and option."""
    from lowbit.autotune.latency import _key
    from lowbit.kernels.advice import Advice

    entries = {}
    for n, opts in zip(table.names, table.options, strict=True):
        r, c = table.shapes[n]
        for cand in opts:
            entries[_key(r, c, cand, "float16")] = {
                "batches": [1],
                "us": {"fp32": [50.0], "x": [us_of(cand.name)]},
            }
    return Advice({}, entries)


def test_latency_budget_picks_the_least_loss_within_it(table):
    us = {"w2g16": 1.0, "w4g16": 2.0, "w8": 3.0}
    table.add_latencies(advice=_advice_for(table, us.get))
    n = len(table.names)
    plan = choose(table, Budget(max_latency_us=2.0 * n))
    assert plan.latency_us == pytest.approx(sum(us[c.name] for c in plan.layers.values()))
    assert plan.latency_us <= 2.0 * n
    by_bytes = choose(table, Budget(max_bytes=plan.bytes))  # same costs shape: never a worse loss
    assert by_bytes.predicted_loss <= plan.predicted_loss + 1e-12
    slow = choose(table, Budget(max_latency_us=3.0 * n))
    assert set(slow.counts()) == {"w8"} and slow.predicted_loss <= plan.predicted_loss
    with pytest.raises(
        LowbitError, match=rf"no plan runs within 1.0 us per call: the fastest reachable is {n}.0 us"
    ):
        choose(table, Budget(max_latency_us=1.0))


def test_missing_latency_advice_is_measured_and_said(table):
    from lowbit.kernels.advice import Advice

    fresh = sensitivity_table(tiny_llama(), _calib(1), ["w4g16", "w8"], exclude=["lm_head"])
    with pytest.warns(
        UserWarning,
        match=r"no latency advice on this machine for 8 layer shape x format pairs .* to the given advice",
    ):
        fresh.add_latencies(advice=Advice())
    assert all(t > 0 for row in fresh.latency_us for t in row)


def test_latency_budget_refuses_static_plans():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    calib = [(torch.randn(4, 16), torch.randint(0, 16, (4,)))]
    t = sensitivity_table(model, calib, ["w4-sym", "w8-sym"], base=lowbit.StaticW8A8(),
                          loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))  # fmt: skip
    with pytest.raises(LowbitError, match="latency budgets plan weight-only Linears"):
        choose(t, Budget(max_latency_us=10.0), lowbit.StaticW8A8())


def test_kl_sensitivity_is_non_negative_and_zero_for_an_exact_format(table):
    model = tiny_llama()
    kl = sensitivity_table(model, _calib(), CANDS, exclude=["lm_head"], measure="kl")
    assert kl.costs == table.costs and all(v >= 0.0 for row in kl.losses for v in row)
    assert sum(r[0] for r in kl.losses) > 100 * sum(r[2] for r in kl.losses)  # w2g16 vs w8
    layer = kl.names[0]
    same = lowbit.autotune.one_layer_kl(
        model, _calib(), {layer: model.get_submodule(layer)}, lowbit.autotune.parse_candidates("w8")[0],
        scale_dtype="float32",
    )[layer]  # fmt: skip
    assert 0.0 <= same < 1e-4
    plan = choose(kl, Budget(bits=4.5))
    assert plan.bits_per_weight <= 4.5
