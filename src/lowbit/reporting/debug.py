"""``lowbit debug``: the first layer whose output SQNR falls below a threshold, and the worst ten.

A lowbit model runs beside its float baseline on the same samples, layer by layer
(``lowbit.eval.layers``: the local output SQNR is the error each layer adds on the inputs it really
receives, so the layer that broke stands out from the ones after it); each named layer is shown with its
format, weight scales, input range and clipped fraction. A QDQ ONNX model is compared with its float ONNX
model in ONNX Runtime the same way (``lowbit.eval.onnx_debug``).
"""

from __future__ import annotations

import math
import os

import torch

from lowbit.core.errors import LowbitError
from lowbit.reporting.data import EvalData, check_fits, default_spec, read_data

WORST = 10


def _fmt(v) -> str:
    return "-" if v is None else ("inf" if math.isinf(v) else f"{v:.1f}")


def _detail(model, e, ranges: dict) -> dict:
    """A layer's row: SQNRs, format, its weight scales' range, input range and clipped fraction."""
    m = model.get_submodule(e.name)
    scale = getattr(m, "scale", None)
    rng = ranges.get(e.name)
    return {
        "name": e.name, "format": e.format, "weight_sqnr_db": e.weight_sqnr_db,
        "output_sqnr_db": e.output_sqnr_db, "end_to_end_sqnr_db": e.end_to_end_sqnr_db,
        "scale_min": None if scale is None else float(scale.float().min()),
        "scale_max": None if scale is None else float(scale.float().max()),
        "input_low": None if rng is None else rng.low, "input_high": None if rng is None else rng.high,
        "clipped": None if rng is None else rng.clipped, "note": e.note,
    }  # fmt: skip


def _markdown(first: dict | None, worst: list[dict], threshold: float, n_layers: int) -> str:
    head = f"{n_layers} quantized layers; threshold {threshold:g} dB (local output SQNR)"
    lines = [head]
    if first is None:
        lines.append(f"no layer below {threshold:g} dB")
    else:
        below = f"{_fmt(first['output_sqnr_db'])} dB"
        lines.append(f"first layer below {threshold:g} dB: {first['name']} ({below})")
    lines += [
        "",
        "| layer | format | weight dB | output dB | end-to-end dB | scale min..max | input range | clipped |",
        "|---|---|---:|---:|---:|---|---|---:|",
    ]
    for r in worst:
        scale = "-" if r["scale_min"] is None else f"{r['scale_min']:.3g}..{r['scale_max']:.3g}"
        rng = "-" if r["input_low"] is None else f"{r['input_low']:.3g}..{r['input_high']:.3g}"
        clip = "-" if r["clipped"] is None else f"{100 * r['clipped']:.2f}%"
        mark = " **(first)**" if first is not None and r["name"] == first["name"] else ""
        sqnrs = " | ".join(_fmt(r[k]) for k in ("weight_sqnr_db", "output_sqnr_db", "end_to_end_sqnr_db"))
        lines.append(f"| {r['name']}{mark} | {r['format']} | {sqnrs} | {scale} | {rng} | {clip} |")
    return "\n".join(lines)


def debug(
    ref: str | os.PathLike,
    *,
    baseline: str | None = None,
    data: str | None = None,
    threshold: float = 20.0,
    float_onnx: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Debug checkpoint ``ref`` against ``baseline`` (default: its float source) on ``data``, or QDQ ONNX
    ``ref`` against ``float_onnx``; returns ``first`` (or None), ``worst`` and ``markdown``."""
    if str(ref).endswith(".onnx") or float_onnx is not None:
        return _debug_onnx(ref, float_onnx, data, threshold)
    from lowbit.eval.layers import first_below, layer_errors, worst
    from lowbit.eval.ranges import activation_ranges
    from lowbit.reporting.build import load_models

    model, base, tok, _, _ = load_models(ref, baseline, None, progress)
    if base is None:
        raise LowbitError(f"{ref} names no float model to compare with; pass --baseline MODEL")
    d = read_data(data or default_spec(model, tok), tok, model)
    check_fits(model, d)
    batches, fwd = d.layer_batches(), d.forward()
    torch.manual_seed(0)
    layers = layer_errors(model, base, batches, fwd)
    ranges = {x.name: x for x in activation_ranges(model, batches, fwd)}
    first = first_below(layers, threshold)
    first_row = None if first is None else _detail(model, first, ranges)
    rows = [_detail(model, e, ranges) for e in worst(layers, WORST)]
    return {"model": str(ref), "threshold_db": threshold, "first": first_row, "worst": rows,
            "markdown": _markdown(first_row, rows, threshold, len(layers))}  # fmt: skip


def _debug_onnx(ref, float_onnx, data: str | None, threshold: float) -> dict:
    from lowbit.eval import onnx_debug

    if float_onnx is None or not str(ref).endswith(".onnx"):
        raise LowbitError("an ONNX debug takes the QDQ model as REF (a .onnx file) and --float FLOAT.onnx")
    d = _onnx_data(ref, data)
    result = onnx_debug.compare_onnx(float_onnx, ref, d, threshold_db=threshold)
    return {"model": str(ref), "float": str(float_onnx), "threshold_db": threshold, **result.to_dict(),
            "markdown": onnx_debug.format_debug(result)}  # fmt: skip


def _onnx_data(path, data: str | None) -> dict:
    """The first graph input fed with ``data`` (default photos:16) as float32 numpy."""
    import onnx

    if data is None:
        data = "photos:16"
    d: EvalData = read_data(data, None)
    try:
        name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad input file
        raise LowbitError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    return {name: d.samples[: min(len(d.samples), 16)].numpy()}
