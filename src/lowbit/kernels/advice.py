"""Measured backend advice: which backend is fastest for a layer's op, shape and spec at each batch size.

``lowbit.eval.advise`` measures it on this machine and keeps it in ``<cache root>/advice/<machine>.json``;
this module holds the data and turns it into per-layer routes. A route is a tuple of
``(max_rows, backend)`` pairs, ascending: a call with ``rows`` activation rows runs on the first backend
whose ``max_rows >= rows`` (the last one beyond). ``apply_advice(model, advice)`` sets ``layer.routes``
on every quantized layer the advice covers; ``registry.dispatch`` follows them, and falls back to normal
selection when a routed backend cannot run the call (another device, a build that went missing).

Entry key: ``"<op>|<rows>x<cols>|<spec key>"``; entry: ``{"batches": [b, ...], "us": {backend: [us or
None per batch]}}`` (None: not measured, e.g. a backend cut off after being far slower than float).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.core.fsio import atomic_write_text, cache_root
from lowbit.core.spec import QuantSpec

ADVICE_VERSION = 1
FLOAT = "fp32"  # the float baseline's name in entries


def spec_key(spec: QuantSpec) -> str:
    """Compact text for what a kernel cares about: format, symmetry, granularity, scale dtype."""
    g = spec.to_dict()["granularity"]
    gran = ",".join(f"{k}={v}" for k, v in sorted(g.items()) if k != "kind")
    sym = "sym" if spec.symmetric else "asym"
    return f"{spec.format}/{sym}/{g['kind']}{'(' + gran + ')' if gran else ''}/{spec.scale_dtype}"


def entry_key(op: str, rows: int, cols: int, spec: QuantSpec) -> str:
    return f"{op}|{rows}x{cols}|{spec_key(spec)}"


def layer_op(layer: nn.Module) -> str | None:
    """The kernel op a quantized module runs, or None for modules without routes (embeddings)."""
    return getattr(type(layer), "KERNEL_OP", None)


@dataclass
class Advice:
    """Measured latencies (microseconds) by entry key; ``machine`` says where they were taken."""

    machine: dict = field(default_factory=dict)
    entries: dict[str, dict] = field(default_factory=dict)

    def best(self, key: str, batch_index: int, include_float: bool = False) -> tuple[str, float] | None:
        """(backend, us) fastest at ``batches[batch_index]`` of entry ``key``."""
        us = self.entries[key]["us"]
        cands = [(t[batch_index], n) for n, t in us.items() if t[batch_index] is not None]
        cands = [(t, n) for t, n in cands if include_float or n != FLOAT]
        return (min(cands)[1], min(cands)[0]) if cands else None

    def routes(self, key: str) -> tuple[tuple[int, str], ...] | None:
        """Route for entry ``key``: the fastest quantized backend up to each measured batch size."""
        e = self.entries.get(key)
        if e is None:
            return None
        out: list[tuple[int, str]] = []
        for i, b in enumerate(e["batches"]):
            best = self.best(key, i)
            if best is None:
                continue
            if out and out[-1][1] == best[0]:
                out[-1] = (b, best[0])
            else:
                out.append((b, best[0]))
        return tuple(out) or None

    def to_json(self) -> str:
        return json.dumps(
            {"version": ADVICE_VERSION, "machine": self.machine, "entries": self.entries}, indent=1
        )

    @classmethod
    def from_json(cls, text: str, source: str = "advice") -> Advice:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise LowbitError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("version", 0) > ADVICE_VERSION:
            raise LowbitError(f"{source}: advice format {d.get('version')!r} is newer than this lowbit reads")
        return cls(d.get("machine", {}), d.get("entries", {}))


def machine() -> dict:
    """What makes measurements comparable: CPU model, threads, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}


def cache_path(mach: dict | None = None) -> Path:
    """Where this machine's advice lives."""
    m = mach or machine()
    name = "".join(c if c.isalnum() else "-" for c in f"{m['cpu']}-t{m['threads']}-torch{m['torch']}")
    return cache_root() / "advice" / f"{name}.json"


def load_cached(path: Path | None = None) -> Advice:
    """This machine's cached advice (empty if none yet)."""
    p = path or cache_path()
    return Advice.from_json(p.read_text(), str(p)) if p.exists() else Advice(machine())


def save_cached(advice: Advice, path: Path | None = None) -> Path:
    p = path or cache_path(advice.machine or None)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, advice.to_json())
    return p


def apply_advice(model: nn.Module, advice: Advice) -> int:
    """Set ``routes`` on each quantized layer of ``model`` the advice covers; returns how many."""
    n = 0
    for m in model.modules():
        op = layer_op(m)
        if op is None:
            continue
        r = advice.routes(entry_key(op, m.rows, m.cols, m.spec))
        if r is not None:
            m.routes = r
            m.__dict__.pop("_lowbit_dispatch", None)
            n += 1
    return n
