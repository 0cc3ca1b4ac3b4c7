"""Per-layer latency of each candidate format on this machine: the cost a latency budget is spent in.

A layer's latency in a candidate is the fastest backend's microseconds per call of a ``QLinear`` of that
shape and format at ``batch`` activation rows (1: one decoded token), as ``lowbit advise`` measures it
and keeps it in this machine's advice cache (``lowbit.kernels.advice``). Shapes and formats the cache
lacks are measured now (random weights: speed only), added to the cache, and reported, so a second run
reads them. The sum over planned layers is what ``Budget(max_latency_us=...)`` bounds: the planned
Linears' matmul time per decode step, not attention, norms or the LM head.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence

import torch

from lowbit.algorithms.rtn import rtn
from lowbit.autotune.candidates import Candidate
from lowbit.kernels.advice import Advice, entry_key, load_cached, save_cached


def _key(rows: int, cols: int, cand: Candidate, scale_dtype: str) -> str:
    return entry_key("weight_only_linear", rows, cols, cand.spec(scale_dtype))


def _layer(rows: int, cols: int, cand: Candidate, scale_dtype: str):
    from lowbit.nn.modules import QLinear

    torch.manual_seed(0)
    spec = cand.spec(scale_dtype)
    q = QLinear(cols, rows, spec, bias=False)
    q.set_weight(rtn(torch.randn(rows, cols), spec))
    return q


def _us(advice: Advice, key: str, batch: int) -> float | None:
    e = advice.entries.get(key)
    if e is None or batch not in e["batches"]:
        return None
    best = advice.best(key, list(e["batches"]).index(batch))
    return None if best is None else best[1]


def candidate_latencies(
    shapes: Mapping[str, tuple[int, int]],
    options: Sequence[Sequence[Candidate]],
    scale_dtype: str = "float16",
    batch: int = 1,
    advice: Advice | None = None,
    rounds: int = 5,
) -> list[list[float]]:
    """Microseconds per call of layer ``i`` (``shapes``, fqn -> ``(rows, cols)``, in order) in each of its
    ``options[i]`` at ``batch`` rows: from ``advice`` (default: this machine's cache), measured and cached
    where missing (a ``UserWarning`` says how many and how long)."""
    from lowbit.eval.advise import measure_layer

    cached = advice is None
    advice = load_cached() if cached else advice
    todo = {
        (r, c, cand)
        for (r, c), opts in zip(shapes.values(), options, strict=True)
        for cand in opts
        if _us(advice, _key(r, c, cand, scale_dtype), batch) is None
    }
    t0 = time.perf_counter()
    for r, c, cand in sorted(todo, key=lambda t: (t[0], t[1], t[2].name)):
        entry = measure_layer(_layer(r, c, cand, scale_dtype), [batch], rounds) | {"scheme": cand.name}
        advice.entries[_key(r, c, cand, scale_dtype)] = entry
    if todo:
        kept = f"kept them in {save_cached(advice)}" if cached else "added them to the given advice"
        warnings.warn(
            f"no latency advice on this machine for {len(todo)} layer shape x format pairs at batch {batch}: "
            f"measured them now ({time.perf_counter() - t0:.0f} s) and {kept}",
            stacklevel=2,
        )
    return [
        [_us(advice, _key(r, c, cand, scale_dtype), batch) for cand in opts]
        for (r, c), opts in zip(shapes.values(), options, strict=True)
    ]
