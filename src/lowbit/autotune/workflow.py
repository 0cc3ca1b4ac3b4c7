"""``lowbit autotune``: measure, plan, quantize, save and evaluate a mixed-precision language model.

``run`` loads a model reference, builds the sensitivity table on the calibration text (``tune``), picks
the plan for the budget, quantizes the float model with it (the base config's method, AWQ+GPTQ by
default; modules that ``include``/``exclude`` leave out stay float, as in planning), saves it to ``out``
with ``plan.json`` beside the weights, reloads it and evaluates held-out perplexity and decode speed.
With ``pareto=N`` it also saves, reloads and evaluates N plans spread over the frontier
(``out/pareto/<bits>``). A loss budget (``max_ppl_increase``) is met in rounds: the predicted
additive loss is rescaled by the loss increase measured on the calibration text after each round."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import time
from pathlib import Path

from lowbit.autotune.candidates import DEFAULT_CANDIDATES, parse_candidates
from lowbit.autotune.sensitivity import lm_loss, mean_loss
from lowbit.autotune.tune import MEASURES, Budget, Plan, Table, check_candidates, choose, sensitivity_table
from lowbit.core.errors import LowbitError
from lowbit.core.fsio import atomic_write_text, check_target
from lowbit.export.checkpoint import is_checkpoint, save
from lowbit.transforms import WeightOnly, parse_scheme, quantize_

PLAN_FILE = "plan.json"
PLAN_FORMAT = "lowbit-mixed-precision-plan"
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """Bytes of ``80MB``, ``1.5GiB``, ``1000000`` (decimal kB/MB/GB, binary KiB/MiB/GiB)."""
    m = _SIZE.fullmatch(str(text).strip())
    if not m:
        raise LowbitError(f"bad size {text!r}; write e.g. 80MB, 1.5GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


_TIME = re.compile(r"(\d+(?:\.\d+)?)\s*(us|ms|s)", re.IGNORECASE)
_TIME_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def parse_latency(text: str) -> float:
    """Microseconds of ``800us``, ``8ms``, ``0.008s``."""
    m = _TIME.fullmatch(str(text).strip())
    if not m or float(m.group(1)) <= 0:
        raise LowbitError(f"bad latency {text!r}; write e.g. 8ms or 800us (per decoded token)")
    return float(m.group(1)) * _TIME_UNITS[m.group(2).lower()]


def plan_record(plan: Plan) -> dict:
    """``plan.json``: the config ``quantize_`` applies and, per planned layer, its format, parameters,
    bytes, predicted loss increase and relative weight error."""
    layers = {}
    for n, c in plan.layers.items():
        est = plan.sensitivity[n][c.name]
        used = next(k for k in ("kl", "measured", "fisher") if k in est)
        layers[n] = {"format": c.name, "params": plan.params[n], "predicted_loss": est[used],
                     "frobenius": est["frobenius"]}  # fmt: skip
    return {
        "format": PLAN_FORMAT,
        "version": 1,
        "config": plan.config.to_dict(),
        "bits_per_weight": round(plan.bits_per_weight, 4),
        "bytes": plan.bytes,
        "predicted_loss": plan.predicted_loss,
        "latency_us": plan.latency_us,
        "counts": plan.counts(),
        "layers": layers,
        "left_to_base": plan.left_to_base,
    }


def _quantize_save_eval(
    float_model, tok, plan: Plan, calib, out: Path, overwrite: bool, progress: bool, select: dict
) -> dict:
    """Quantize a copy of ``float_model`` with ``plan`` (on the modules ``select``'s include/exclude keep),
    save it with its plan.json, reload, evaluate held-out perplexity and greedy decode speed (tokens/s,
    64-token prompt, 32 new, median of 3)."""
    from lowbit.data import eval_tokens
    from lowbit.eval.bench import end_to_end
    from lowbit.eval.perplexity import perplexity
    from lowbit.workflows import load_any

    model = copy.deepcopy(float_model)
    t0 = time.perf_counter()
    quantize_(model, plan.config, calib if plan.config.needs_calib else None, progress=progress, **select)
    seconds = time.perf_counter() - t0
    save(model, out, tokenizer=tok, overwrite=overwrite)
    atomic_write_text(out / PLAN_FILE, json.dumps(plan_record(plan), indent=1) + "\n")
    del model
    loaded, _ = load_any(out, progress)
    tokens = eval_tokens(tok, 8192)
    ppl = perplexity(loaded, tokens, window=512, progress=progress)
    speed = end_to_end({"q": loaded}, tokens[None, :64], new=32, rounds=3)["q"]["decode_tok_s"]
    return {"bits_per_weight": round(plan.bits_per_weight, 3), "planned_mb": round(plan.bytes / 1e6, 2),
            "predicted_loss": round(plan.predicted_loss, 4), "perplexity": ppl, "decode_tok_s": speed,
            "latency_us": None if plan.latency_us is None else round(plan.latency_us, 1),
            "quantize_seconds": round(seconds, 1), "counts": plan.counts(), "out": str(out)}  # fmt: skip


def _loss_budget(
    model, table: Table, base: WeightOnly, calib, increase: float, rounds: int, select: dict
) -> Plan:
    """The plan for a perplexity increase of ``increase`` (0.05 = 5%): the predicted loss is rescaled by
    the calibration loss increase measured after each of ``rounds`` quantizations."""
    target, factor = math.log1p(increase), 1.0
    base_loss = mean_loss(model, calib, lm_loss)
    plan = choose(table, Budget(max_loss=target / factor), base)
    for _ in range(rounds):
        trial = copy.deepcopy(model)
        quantize_(trial, plan.config, calib if plan.config.needs_calib else None, **select)
        measured = mean_loss(trial, calib, lm_loss) - base_loss
        factor = max(measured, 1e-9) / max(plan.predicted_loss, 1e-12)
        plan = choose(table, Budget(max_loss=target / factor), base)
    return plan


def _budget(size, bits, increase, latency=None) -> Budget | None:
    """The size, bits or latency budget the flags give, None for a perplexity budget; ``LowbitError``
    unless exactly one is given or for a malformed size or latency."""
    flags = (
        ("--max-size", size),
        ("--bits", bits),
        ("--max-ppl-increase", increase),
        ("--max-latency", latency),
    )
    given = [k for k, v in flags if v is not None]
    if len(given) != 1:
        raise LowbitError(
            "give exactly one of --max-size, --bits, --max-ppl-increase, --max-latency "
            f"(got {given or 'none'})"
        )
    if increase is not None:
        return None
    if latency is not None:
        return Budget(max_latency_us=parse_latency(latency))
    return Budget(max_bytes=parse_size(size)) if size is not None else Budget(bits=float(bits))


def run(
    ref: str,
    out: str | os.PathLike,
    *,
    calib: str,
    max_size: str | None = None,
    bits: float | None = None,
    max_ppl_increase: float | None = None,
    max_latency: str | None = None,
    candidates: str | None = None,
    base: str = "w4g128",
    method: str = "awq+gptq",
    include=(),
    exclude=(),
    pareto: int = 0,
    rounds: int = 1,
    measure: str = "fisher",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """The ``lowbit autotune`` job (module docstring); returns the chosen plan's row, the Pareto rows and
    the markdown table. ``max_size``: bytes of the planned layers (e.g. "60MB"); ``bits``: bits per weight
    over them; ``max_ppl_increase``: a fraction (0.05 = 5%); ``max_latency``: summed per-token
    latency of the planned Linears (e.g. "8ms", ``lowbit.autotune.latency``); ``measure``: the sensitivity,
    ``lowbit.autotune.tune.MEASURES``."""
    from lowbit.workflows import calibration_batches, load_any

    cands = parse_candidates(candidates or list(DEFAULT_CANDIDATES))
    config = parse_scheme(base, method)
    if not isinstance(config, WeightOnly):
        raise LowbitError(f"--base must be a weight-only scheme (w4g128, w3g64...), got {base!r}")
    if pareto < 0 or rounds < 0:
        raise LowbitError("--pareto and --rounds must be >= 0")
    if measure not in MEASURES:
        raise LowbitError(f"unknown --measure {measure!r}; known: {', '.join(MEASURES)}")
    budget = _budget(max_size, bits, max_ppl_increase, max_latency)  # bad budget: error before loading
    check_candidates(config, cands)
    out = check_target(out, overwrite, replaceable=is_checkpoint)
    model, tok = load_any(ref, progress)
    batches = calibration_batches(calib, tok)
    t0 = time.perf_counter()
    table = sensitivity_table(
        model,
        batches,
        cands,
        base=config,
        include=include,
        exclude=exclude,
        progress=progress,
        measure=measure,
    )
    select = {"include": include, "exclude": exclude}  # layers the plan leaves out stay float
    if budget is None:
        plan = _loss_budget(model, table, config, batches, float(max_ppl_increase), rounds, select)
    else:
        plan = choose(table, budget, config)
    plan_seconds = time.perf_counter() - t0
    chosen = _quantize_save_eval(model, tok, plan, batches, out, overwrite, progress, select)
    rows = []
    for c in table.frontier.pareto(pareto) if pareto else []:
        p = table.plan(c, config)
        rows.append(
            _quantize_save_eval(
                model,
                tok,
                p,
                batches,
                out.parent / f"{out.name}-pareto-{p.bits_per_weight:.2f}bpw",
                True,
                progress,
                select,
            )
        )
    return {"model": ref, "out": str(out), "plan_seconds": round(plan_seconds, 1), "chosen": chosen,
            "pareto": rows, "left_to_base": plan.left_to_base,
            "markdown": markdown(chosen, rows)}  # fmt: skip


def markdown(chosen: dict, rows: list[dict]) -> str:
    """The Pareto table (measured rows) and the chosen plan, as markdown."""
    lines = ["| plan | bits/weight | planned MB | predicted dloss | perplexity | decode tok/s | formats |",
             "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for label, r in [("chosen", chosen), *((f"pareto {i + 1}", r) for i, r in enumerate(rows))]:
        counts = ", ".join(f"{k} x{v}" for k, v in r["counts"].items())
        size = f"{r['bits_per_weight']:.3f} | {r['planned_mb']:.2f} | {r['predicted_loss']:.4f}"
        lines.append(f"| {label} | {size} | {r['perplexity']:.2f} | {r['decode_tok_s']:.1f} | {counts} |")
    return "\n".join(lines)
