"""Latency measurement that compares candidates fairly: interleaved rounds, medians, warm and cold caches.

``compare(candidates, rounds, min_seconds)`` runs every candidate once per round, in turn, so slow drift
of the machine (frequency, a neighbour's load) hits all of them alike; each round times enough calls to
last ``min_seconds`` and the result is the median over rounds, in microseconds per call.

A warm measurement calls the same layer again and again: its weights stay in cache, which flatters small
(quantized) weights most. ``cold_copies`` gives how many copies of a layer to cycle through so that
their weights together exceed the last-level cache, for a measurement where weights come from DRAM.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

COLD_BYTES = 128 << 20  # well above the last-level cache of common CPUs (tens of MiB)


def _calls_for(fn: Callable[[], object], min_seconds: float) -> int:
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-7)
    return max(1, int(min_seconds / dt))


def compare(
    candidates: dict[str, Callable[[], object]], rounds: int = 15, min_seconds: float = 0.02, warmup: int = 3
) -> dict[str, float]:
    """Median microseconds per call of each candidate, measured in interleaved rounds."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    calls = {k: _calls_for(fn, min_seconds) for k, fn in candidates.items()}
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(rounds):
        for k, fn in candidates.items():
            t0 = time.perf_counter()
            for _ in range(calls[k]):
                fn()
            samples[k].append((time.perf_counter() - t0) / calls[k] * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def cold_copies(weight_bytes: int, cold_bytes: int = COLD_BYTES) -> int:
    """Copies of a layer holding ``weight_bytes`` to cycle through so their total exceeds ``cold_bytes``."""
    return max(2, -(-cold_bytes // max(weight_bytes, 1)))


def cycling(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One callable that calls ``fns`` in turn, one per call (for cold-cache timing)."""
    state = {"i": 0}

    def step():
        i = state["i"]
        state["i"] = (i + 1) % len(fns)
        return fns[i]()

    return step
