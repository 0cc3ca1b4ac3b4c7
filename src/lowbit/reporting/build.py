"""``lowbit report``: one driver that measures a quantized model against its float baseline and writes
``report.html`` (self-contained, plots inline), ``report.json`` (every number) and ``MODEL_CARD.md``
into a new folder, atomically (an interrupted run leaves nothing behind).

What cannot be measured is said, never guessed: a checkpoint whose float baseline is unknown gets size,
its own quality, layer formats, ranges, energy and speed, and the report lists what needs a baseline.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.core.fsio import atomic_dir, check_target
from lowbit.nn.modules import QuantizedModule
from lowbit.reporting import measure
from lowbit.reporting.data import EvalData, check_fits, default_spec, read_data


def is_report(folder: Path) -> bool:
    """Whether ``folder`` holds a lowbit report (what ``overwrite`` may replace)."""
    return (folder / "report.json").is_file()


def load_models(ref, baseline, scheme, progress):
    """(quantized, baseline or None, tokenizer, baseline name or None, notes) for ``report``/``debug``."""
    from lowbit.transforms import parse_scheme, quantize_
    from lowbit.workflows import load_any

    model, tok = load_any(ref, progress)
    quantized = any(isinstance(m, QuantizedModule) for m in model.modules())
    if scheme is not None:
        if quantized:
            raise LowbitError(f"{ref} is already quantized; drop --scheme (it is reported as saved)")
        base, model = model, copy.deepcopy(model)
        quantize_(model, parse_scheme(scheme))
        return model, base, tok, str(ref), []
    if not quantized:
        raise LowbitError(
            f"{ref} holds no quantized layer: pass a lowbit checkpoint (lowbit quantize ... --out DIR) or "
            "a float model with --scheme"
        )
    name = baseline or getattr(model, "lowbit_source", None)
    if name is None:
        return model, None, tok, None, ["baseline: the checkpoint names no float model; pass --baseline"]
    try:
        base, _ = load_any(name, progress)
    except LowbitError as e:
        if baseline is not None:
            raise LowbitError(f"--baseline {baseline}: {e}") from None
        why = f"baseline: the checkpoint's float source {name} cannot be loaded ({e}); pass --baseline"
        return model, None, tok, None, [why]
    return model, base.eval(), tok, str(name), []


def _groups(data: EvalData, groups_csv, group_by: str | None) -> str:
    """The grouping the audit uses: the user's CSV (added as "your groups"), ``group_by``, or the data's
    first. Photos also group by the float model's class, known only once it ran (checked there)."""
    if groups_csv is not None:
        from lowbit.data.groups import read_groups

        data.groups["your groups"] = read_groups(groups_csv, data.ids)
        return "your groups"
    known = [*data.groups, *(["class"] if data.kind == "photos" else [])]
    if group_by is not None and group_by not in known:
        raise LowbitError(f"--group-by {group_by!r}: {data.spec} has the groupings {', '.join(known)}")
    return group_by or next(iter(data.groups))


def _measure(model, base, data: EvalData, grouping: str, speed: bool, progress: bool, r: dict) -> None:
    """Fill the measured sections of report ``r`` (see ``report``)."""
    from lowbit.eval.layers import layer_errors
    from lowbit.eval.ranges import activation_ranges

    t, missing = r["timings_s"], r["not_measured"]
    quant = measure.timed(lambda: measure.scores(model, data, progress), t, "quality quantized")
    ref = (
        None
        if base is None
        else measure.timed(lambda: measure.scores(base, data, progress), t, "quality baseline")
    )
    if data.kind == "photos":
        if ref is None:
            missing.append("quality: photos are scored by agreement with the float model, which is unknown")
        else:
            data.labels = ref
            data.groups["class"] = [f"ImageNet class {int(c)}" for c in ref]
    scored = data.labels is not None or data.kind in ("causal-lm", "embeddings")
    if scored:
        r["quality"] = measure.quality(data, ref, quant)
    if ref is not None and scored:
        r["audit"] = measure.timed(lambda: measure.subgroup_audit(data, ref, quant, grouping), t, "audit")
    elif base is None:
        missing.append("subgroup audit and per-layer errors: need the float baseline")
    batches, fwd = data.layer_batches(), data.forward()
    layers = measure.timed(lambda: layer_errors(model, base, batches, fwd), t, "layers")
    r["layers"] = [e.to_dict() for e in layers]
    ranges = measure.timed(lambda: activation_ranges(model, batches, fwd), t, "ranges")
    r["ranges"] = [vars(x) | {"representable": x.representable} for x in ranges]
    r["size"] = measure.size(model, base, layers)
    r["energy"] = measure.timed(lambda: measure.energy(model, base, data), t, "energy")
    if r["energy"]["measured"] is None:
        missing.append("measured energy: this machine exposes no RAPL energy counter (estimate only)")
    if speed:
        r["speed"] = measure.timed(lambda: measure.speed(model, base, data), t, "speed")
    else:
        missing.append("speed: skipped (--no-speed)")
    missing.append("per-layer speed: run lowbit bench REF for the per-layer backend table")


def _scheme(config: dict) -> str:
    """A config's scheme in CLI words (w4g128, w8a8-static, ...) or its type."""
    kind = config.get("type", "")
    if kind == "WeightOnly":
        g = config.get("group_size")
        return f"w{config['bits']}" + (f"g{g}" if g else "")
    return {"StaticW8A8": "w8a8-static", "Int8Dynamic": "w8a8", "SmoothQuant": "w8a8 smoothquant"}.get(
        kind, kind
    )


def _title(ref, model, base_name: str | None) -> str:
    """The float model's name, the scheme and the method (the checkpoint folder's name for an unknown
    float model)."""
    config = getattr(model, "lowbit_config", None) or {}
    method = config.get("method") if config.get("type") == "WeightOnly" else None
    name = Path(base_name).name if base_name else Path(str(ref)).name
    return " ".join(x for x in (name, _scheme(config), method) if x)


def report(
    ref: str | os.PathLike,
    out: str | os.PathLike,
    *,
    baseline: str | None = None,
    scheme: str | None = None,
    data: str | None = None,
    groups: str | os.PathLike | None = None,
    group_by: str | None = None,
    speed: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Measure checkpoint ``ref`` (or float model ``ref`` quantized with ``scheme``) against ``baseline``
    (default: the checkpoint's own float source) on ``data`` (``lowbit.reporting.data``; default: the
    model's task) and write the report folder ``out``; returns the report dict with ``path``. The audit
    groups samples by ``group_by`` (article, class, photo; default the data's first) or by the user's
    ``groups`` CSV (``lowbit.data.groups.read_groups``)."""
    check_target(out, overwrite, replaceable=is_report)
    model, base, tok, base_name, missing = load_models(ref, baseline, scheme, progress)
    data_set = read_data(data or default_spec(model, tok), tok, model)
    check_fits(model, data_set)
    grouping = _groups(data_set, groups, group_by)
    config = getattr(model, "lowbit_config", None) or {}
    r = {
        "format": "lowbit-report", "version": 1, "title": _title(ref, model, base_name),
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lowbit_version": _version(), "command": command,
        "model": {"reference": str(ref), "baseline": base_name, "kind": data_set.kind,
                  "scheme": scheme or _scheme(config), "method": config.get("method"), "config": config,
                  "layers_quantized": None, "parameters": None},
        "size": None, "quality": None, "speed": None, "layers": None, "ranges": None, "energy": None,
        "audit": None, "not_measured": missing, "timings_s": {},
    }  # fmt: skip
    torch.manual_seed(0)
    _measure(model, base, data_set, grouping, speed, progress, r)
    r["model"]["layers_quantized"] = len(r["layers"])
    counted = base if base is not None else model  # parameters() counts a tied weight once
    floats = sum(p.numel() for p in counted.parameters())
    r["model"]["parameters"] = floats + (0 if base is not None else sum(e["params"] for e in r["layers"]))
    _write(r, out, overwrite)
    return r | {"path": str(out)}


def _version() -> str:
    from lowbit import __version__

    return __version__


def _write(r: dict, out, overwrite: bool) -> None:
    from lowbit.eval.html import render_html, render_model_card

    html, card = render_html(r), render_model_card(r)
    with atomic_dir(out, overwrite, replaceable=is_report) as tmp:
        (tmp / "report.json").write_text(
            json.dumps(_finite(r), indent=1, default=_json_default, allow_nan=False)
        )
        (tmp / "report.html").write_text(html, encoding="utf-8")
        (tmp / "MODEL_CARD.md").write_text(card, encoding="utf-8")


def _finite(x):
    """``x`` with NaN and infinite floats as None (strict JSON; an exact layer's SQNR is then null)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (tuple, set)):
        return list(x)
    if isinstance(x, nn.Module):
        return type(x).__name__
    raise TypeError(f"not JSON: {type(x).__name__}")
