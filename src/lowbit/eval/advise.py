"""``advise``: measure, on this machine, which scheme and backend is fastest for each Linear shape and batch.

For every ``(rows, cols)`` shape and scheme, one layer of that shape is quantized (random weights: only
speed is measured here, never accuracy) and each backend that can run it is timed against a float32
``nn.Linear`` of the same shape, in interleaved rounds (``lowbit.eval.latency.compare``). Results land
in this machine's advice cache (``lowbit.kernels.advice``); shapes already measured there are not
measured again unless ``refresh``. A backend far slower than float32 at one batch size (``CUTOFF``
times) is not timed at larger ones: its entries stay None.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lowbit.eval.latency import compare
from lowbit.kernels.advice import FLOAT, Advice, entry_key, layer_op, load_cached, save_cached
from lowbit.kernels.registry import backends
from lowbit.transforms import parse_scheme, quantize_

DEFAULT_SCHEMES = ("w8", "w4g128", "w8a8")
DEFAULT_BATCHES = (1, 4, 16, 64)
CUTOFF = 8.0


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """Distinct ``(out_features, in_features)`` of the model's Linear and quantized Linear layers."""
    shapes = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            shape = (m.out_features, m.in_features)
        elif layer_op(m) is not None:
            shape = (m.rows, m.cols)
        else:
            continue
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def _quantized_layer(rows: int, cols: int, scheme: str) -> nn.Module:
    holder = nn.Sequential(nn.Linear(cols, rows))
    quantize_(holder, parse_scheme(scheme))
    return holder[0]


def _forced(layer: nn.Module, name: str) -> nn.Module:
    """A shallow copy of ``layer`` (same stored buffers) that always runs backend ``name``."""
    clone = copy.copy(layer)
    clone.__dict__.pop("_lowbit_dispatch", None)
    clone.routes, clone.backend = None, name
    return clone


def _entries_for(advice: Advice, rows: int, cols: int, schemes) -> dict[str, str]:
    """{scheme: entry key} of the entries measured for this shape."""
    out = {}
    for k, e in advice.entries.items():
        if k.split("|")[1] == f"{rows}x{cols}" and e.get("scheme") in schemes:
            out[e["scheme"]] = k
    return out


def measure_layer(layer: nn.Module, batches, rounds: int = 5, min_seconds: float = 0.01) -> dict:
    """Entry for one quantized layer: microseconds per call of float32 and each backend at each batch."""
    torch.manual_seed(0)
    ref = nn.Linear(layer.cols, layer.rows)
    op, dev = layer_op(layer), torch.device("cpu")
    names = [b.name for b in backends(op) if b.exact and b.supports(layer, dev)]
    runners = {n: _forced(layer, n) for n in names}
    us: dict[str, list] = {FLOAT: [], **{n: [] for n in names}}
    alive = set(names)
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, layer.cols)
            cands = {FLOAT: lambda x=x: ref(x)}
            cands |= {n: (lambda m=runners[n], x=x: m(x)) for n in names if n in alive}
            t = compare(cands, rounds=rounds, min_seconds=min_seconds)
            for n in us:
                us[n].append(round(t[n], 2) if n in t else None)
            alive = {n for n in alive if t[n] <= CUTOFF * t[FLOAT]}
    return {"batches": list(batches), "us": us}


def measure_shape(rows: int, cols: int, scheme: str, batches, rounds: int = 5) -> tuple[str, dict]:
    """(entry key, entry) for one shape quantized by ``scheme`` (random weights: speed only)."""
    torch.manual_seed(0)
    layer = _quantized_layer(rows, cols, scheme)
    entry = measure_layer(layer, batches, rounds) | {"scheme": scheme}
    return entry_key(layer_op(layer), rows, cols, layer.spec), entry


def advise(
    shapes,
    schemes=DEFAULT_SCHEMES,
    batches=DEFAULT_BATCHES,
    refresh: bool = False,
    progress: bool = False,
    rounds: int = 5,
) -> Advice:
    """Measure what the cache lacks for ``shapes`` x ``schemes`` x ``batches``; returns the updated advice."""
    from tqdm.auto import tqdm

    advice = load_cached()
    todo = [(r, c, s) for r, c in shapes for s in schemes]
    for rows, cols, scheme in tqdm(todo, desc="advise", unit="layer", disable=not progress):
        key = _entries_for(advice, rows, cols, (scheme,)).get(scheme)
        if key and not refresh and list(advice.entries[key]["batches"]) == list(batches):
            continue
        key, entry = measure_shape(rows, cols, scheme, batches, rounds)
        advice.entries[key] = entry
        save_cached(advice)  # after each layer: an interrupted run keeps what it measured
    return advice


def table(advice: Advice, shapes, schemes=DEFAULT_SCHEMES) -> list[dict]:
    """One row per shape and batch: float32 latency, best backend per scheme, and the fastest choice."""
    out = []
    for rows, cols in shapes:
        keys = _entries_for(advice, rows, cols, schemes)
        if not keys:
            continue
        batches = next(iter(advice.entries[k]["batches"] for k in keys.values()))
        for i, b in enumerate(batches):
            row: dict = {"shape": f"{rows}x{cols}", "batch": b}
            fp = [advice.entries[k]["us"][FLOAT][i] for k in keys.values()]
            row[FLOAT] = round(min(fp), 1)
            for s, k in keys.items():
                best = advice.best(k, i)
                row[s] = None if best is None else {"backend": best[0], "us": round(best[1], 1)}
            fastest = min(((v["us"], s) for s, v in row.items() if isinstance(v, dict)), default=None)
            row["fastest"] = FLOAT if fastest is None or fastest[0] >= row[FLOAT] else fastest[1]
            out.append(row)
    return out


def format_table(rows: list[dict], schemes=DEFAULT_SCHEMES) -> str:
    """Markdown: microseconds per call and speedup over float32, best backend per scheme."""
    head = "| shape | batch | fp32 us | " + " | ".join(schemes) + " | fastest |"
    lines = [head, "|" + "---|" * (len(schemes) + 4)]
    for r in rows:
        cells = []
        for s in schemes:
            v = r.get(s)
            cells.append("-" if v is None else f"{v['us']:.0f} us {r[FLOAT] / v['us']:.2f}x ({v['backend']})")
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r[FLOAT]:.0f} | " + " | ".join(cells) + f" | {r['fastest']} |"
        )
    return "\n".join(lines)
