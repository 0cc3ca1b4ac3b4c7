"""A lowbit report (the JSON-able dict of ``lowbit report``) as one self-contained HTML page.

``render_html(report)``: no external resources (inline CSS, inline SVG plots from ``lowbit.eval.plots``,
two inline scripts: the first records script errors in ``<pre id="script-errors">`` and
``body[data-errors]``, the second makes every table with ``data-sortable`` sortable by clicking a header
and marks it ``data-sortable="ready"``). One ``<section id=...>`` per part (``SECTIONS``); a part that is
None or missing reads "not measured: <reason>", the reason taken from the report's ``not_measured``
lines ("<part>: <reason>"). Every string from the report is HTML-escaped. Number formats come from
``lowbit.eval.card``, which also renders the model card (``render_model_card``, re-exported here).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

from lowbit.eval import plots
from lowbit.eval.card import (
    DASH,
    ENERGY_ROWS,
    audit_groups,
    fmt_bytes,
    fmt_ci,
    fmt_db,
    fmt_degradation,
    fmt_int,
    fmt_pct,
    fmt_range,
    fmt_signed,
    fmt_times,
    interval,
    not_measured_lines,
    ratio,
    reason,
    render_model_card,
    sig,
    speedup,
)
from lowbit.eval.plots import FLAGGED, Bar, Hist, finite

__all__ = ["MAX_AUDIT_BARS", "MAX_HISTOGRAMS", "PLOTS", "SECTIONS", "render_html", "render_model_card"]

SECTIONS = ("summary", "size", "quality", "speed", "layers", "ranges", "energy", "audit", "not-measured")
PLOTS = ("size-components", "quality-intervals", "sqnr-depth", "size-vs-error", "range-histograms")
PLOTS += ("audit-degradation",)
MAX_HISTOGRAMS = 48
MAX_AUDIT_BARS = 40

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;
 margin:0 auto;padding:1rem 1.5rem 3rem;color:#222;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
nav a{margin-right:.8rem}table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.9rem}
th,td{border-bottom:1px solid #e4e4e4;padding:.25rem .6rem;text-align:left;white-space:nowrap}
th{background:#f5f5f5;position:sticky;top:0}.num{text-align:right;font-variant-numeric:tabular-nums;
 white-space:nowrap}table[data-sortable] th{cursor:pointer}th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}tr.flagged td{background:#fdecea}tfoot td{font-weight:bold}
.scroll{max-height:32rem;overflow:auto}svg{max-width:100%;height:auto;display:block;margin:.5rem 0}
.kpis{display:flex;flex-wrap:wrap;gap:.8rem}.kpi{border:1px solid #ddd;border-radius:6px;padding:.5rem .8rem;
 min-width:10rem}.kpi .v{font-size:1.3rem;font-weight:bold}.kpi .k,.kpi .s{color:#555;font-size:.85rem}
.missing{color:#666;font-style:italic}#script-errors{color:#b00;white-space:pre-wrap}
#script-errors:empty{display:none}
"""
_ERRORS_JS = """window.onerror=function(msg,src,line,col){var p=document.getElementById('script-errors');
if(p){p.textContent+=msg+' ('+src+':'+line+':'+col+')\\n';}
if(document.body){document.body.dataset.errors=String((Number(document.body.dataset.errors)||0)+1);}
return false;};"""
_SORT_JS = """(function(){
function key(td){var v=td?td.getAttribute('data-v'):null;
if(v!==null){return v===''?null:Number(v);}return td?td.textContent.trim().toLowerCase():null;}
function sortBy(table,th,i){var asc=th.getAttribute('aria-sort')!=='ascending';
Array.prototype.forEach.call(table.tHead.rows[0].cells,function(c){c.removeAttribute('aria-sort');});
th.setAttribute('aria-sort',asc?'ascending':'descending');var body=table.tBodies[0];
var rows=Array.prototype.slice.call(body.rows);
rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
if(x===null||y===null){return (x===null)-(y===null);}return (x<y?-1:x>y?1:0)*(asc?1:-1);});
rows.forEach(function(r){body.appendChild(r);});}
document.querySelectorAll('table[data-sortable]').forEach(function(table){
Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){th.tabIndex=0;
th.addEventListener('click',function(){sortBy(table,th,i);});
th.addEventListener('keydown',function(e){if(e.key==='Enter'){sortBy(table,th,i);}});});
table.setAttribute('data-sortable','ready');});})();"""


def _e(v: object) -> str:
    return html.escape(str(v), quote=True)


def _n(v: object, text: str) -> str:
    """A numeric cell: right-aligned, ``data-v`` the sort key (empty when missing)."""
    return f'<td class="num" data-v="{repr(float(v)) if finite(v) else ""}">{_e(text)}</td>'


def _t(v: object) -> str:
    return f"<td>{_e(DASH if v is None else v)}</td>"


# A column: (header, key or getter of a row dict, format); a header starting with ">" is numeric.
Col = tuple[str, "str | Callable[[dict], object]", Callable[[object], str]]


def _cells(x: dict, cols: Sequence[Col]) -> str:
    out = []
    for head, key, fmt in cols:
        v = key(x) if callable(key) else x.get(key)
        out.append(_n(v, fmt(v)) if head.startswith(">") else _t(v))
    return "".join(out)


def _table(cols: Sequence[Col], items: Sequence[dict], *, sortable: bool = False, foot: str = "") -> str:
    """A table, one row per item (a row whose item has a true ``flagged`` is marked); numeric columns
    right-aligned; ``foot``: a last row kept out of sorting."""
    head = "".join(
        f'<th class="num">{_e(c[0][1:])}</th>' if c[0][0:1] == ">" else f"<th>{_e(c[0])}</th>" for c in cols
    )
    rows = "".join(f"<tr{' class=flagged' if x.get('flagged') else ''}>{_cells(x, cols)}</tr>" for x in items)
    attr = ' data-sortable="pending"' if sortable else ""
    tfoot = f"<tfoot><tr>{foot}</tr></tfoot>" if foot else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody>{tfoot}</table>"


def _kv_table(pairs: Sequence[tuple[str, object]], fmt: Callable[[object], str] = sig) -> str:
    """A two-column table of (name, value): numbers formatted with ``fmt``, other values as text."""
    items = [{"k": k, "v": fmt(v) if finite(v) else v} for k, v in pairs]
    return _table([("field", "k", str), ("value", "v", str)], items)


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{body}</section>'


def _missing(report: dict, key: str) -> str:
    return f'<p class="missing">not measured: {_e(reason(report, key))}</p>'


def _headlines(r: dict) -> list[tuple[str, str, str]]:
    """(name, value, note) of the summary's cards; a missing part reads "not measured"."""
    size, q, speed, en, audit = (r.get(k) or {} for k in ("size", "quality", "speed", "energy", "audit"))
    comp = size.get("compression") or ratio(size.get("baseline_bytes"), size.get("quantized_bytes"))
    d, first = q.get("delta") or {}, (speed.get("rows") or [{}])[0]
    totals = [(en.get(k) or {}).get("total_uj") for k in ("baseline", "quantized")]
    cards = {
        "size": ("compression", fmt_times(comp), f"{fmt_bytes(size.get('baseline_bytes'))} → "
                 f"{fmt_bytes(size.get('quantized_bytes'))}"),
        "quality": ("quality Δ", fmt_ci(d.get("value"), d.get("low"), d.get("high"), fmt_signed),
                    f"{q.get('metric', '')}, {'higher' if q.get('higher_is_better') else 'lower'} is better"),
        "speed": ("speed-up", fmt_times(speedup(first)), str(first.get("name", ""))),
        "energy": ("energy ratio", fmt_times(ratio(*totals)), f"baseline / quantized per {en.get('per')}"),
        "audit": ("flagged groups", f"{len(audit.get('flagged') or [])} of {len(audit.get('groups') or [])}",
                  str(audit.get("grouping", ""))),
    }  # fmt: skip
    return [card if r.get(key) else (card[0], "not measured", "") for key, card in cards.items()]


def _summary(r: dict) -> str:
    cards = "".join(
        f'<div class="kpi"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div>'
        f'<div class="s">{_e(n)}</div></div>'
        for k, v, n in _headlines(r)
    )
    m = r.get("model") or {}
    keys = ("reference", "baseline", "kind", "scheme", "method", "layers_quantized", "parameters")
    pairs = [(k.replace("_", " "), m.get(k)) for k in keys]
    pairs += [("created", r.get("created")), ("lowbit version", r.get("lowbit_version"))]
    return f'<div class="kpis">{cards}</div>' + _kv_table(pairs, fmt_int)


def _size(s: dict, r: dict) -> str:
    base, quant = s.get("baseline_components") or {}, s.get("components") or {}
    items = [{"c": "total", "b": s.get("baseline_bytes"), "q": s.get("quantized_bytes")}]
    items += [{"c": k, "b": base.get(k), "q": quant.get(k)} for k in dict.fromkeys([*quant, *base])]
    cols = [("component", "c", str), (">baseline", "b", fmt_bytes), (">quantized", "q", fmt_bytes)]
    text = (
        f"<p>Compression {_e(fmt_times(s.get('compression')))}; {_e(sig(s.get('bits_per_weight')))} bits per "
        "weight (all stored bytes over the parameters). Bytes in powers of 1000.</p>"
    )
    bars = [("baseline", base or {"total": s.get("baseline_bytes")})]
    bars += [("quantized", quant or {"total": s.get("quantized_bytes")})]
    plot = plots.stacked_bar(
        "size-components", "Stored bytes by component", bars, x_title="bytes", fmt=fmt_bytes
    )
    return text + _table(cols, items) + plot


def _quality(q: dict, r: dict) -> str:
    unit = f" ({q['unit']})" if q.get("unit") else ""
    metric = f"{q.get('metric', 'quality')}{unit}"
    text = (
        f"<p>{_e(q.get('task', ''))}: {_e(metric)}, {'higher' if q.get('higher_is_better') else 'lower'} "
        f"is better, on {_e(q.get('samples', DASH))} {_e(q.get('sample_unit', 'samples'))}; 95% intervals</p>"
    )
    items = [{"name": x.get("model"), **x} for x in q.get("rows") or []]
    items += [{"name": "quantized − baseline", **q["delta"]}] if q.get("delta") else []
    items += q.get("extra") or []
    cols = [("", "name", str), (">value", "value", sig), (">95% low", "low", sig), (">95% high", "high", sig)]
    bars = [
        Bar(str(x.get("model")), x.get("value"), x.get("low"), x.get("high")) for x in q.get("rows") or []
    ]
    plot = plots.bar_chart("quality-intervals", f"{metric} with 95% intervals", bars, x_title=metric)
    return text + _table(cols, items) + plot


def _speed(s: dict, r: dict) -> str:
    cols = [("measure", "name", str), ("unit", "unit", str), (">baseline", "baseline", sig)]
    cols += [(">quantized", "quantized", sig), (">speed-up", speedup, fmt_times)]
    out = f"<p>{_e(s.get('threads', DASH))} threads.</p>" + _table(cols, s.get("rows") or [])
    if not s.get("layers"):
        why = reason(r, "speed layers")
        return out + f'<p class="missing">per-layer times: not measured: {_e(why)}</p>'
    cols = [("layer", "name", str), ("shape", "shape", str), ("backend", "backend", str)]
    cols += [(">baseline µs", "baseline_us", sig), (">quantized µs", "quantized_us", sig)]
    cols += [(">speed-up", lambda x: ratio(x.get("baseline_us"), x.get("quantized_us")), fmt_times)]
    return out + "<h3>Per layer</h3>" + _table(cols, s["layers"], sortable=True)


_LAYER_COLS: list[Col] = [
    ("layer", "name", str),
    ("kind", "kind", str),
    ("format", "format", str),
    ("backend", "backend", str),
    (">params", "params", fmt_int),
    (">bytes", "bytes", fmt_bytes),
    (">weight SQNR", "weight_sqnr_db", fmt_db),
    (">weight rel. error", "weight_rel_error", sig),
    (">output SQNR (local)", "output_sqnr_db", fmt_db),
    (">output SQNR (end to end)", "end_to_end_sqnr_db", fmt_db),
    (">sensitivity", "sensitivity", sig),
]


def _layers(layers: list, r: dict) -> str:
    names = [str(x.get("name")) for x in layers]
    series = {
        "weight SQNR": [x.get("weight_sqnr_db") for x in layers],
        "output SQNR (local)": [x.get("output_sqnr_db") for x in layers],
        "output SQNR (end to end)": [x.get("end_to_end_sqnr_db") for x in layers],
    }
    depth = plots.line_chart("sqnr-depth", "SQNR along the depth", series, labels=names, y_title="SQNR (dB)")
    points = [(x.get("bytes"), x.get("weight_sqnr_db"), str(x.get("name"))) for x in layers]
    size = plots.scatter(
        "size-vs-error", "Size vs error", points, x_title="stored bytes (log scale)",
        y_title="weight SQNR (dB)", log_x=True, x_fmt=fmt_bytes,
    )  # fmt: skip
    text = (
        "<p>SQNR: signal over error power in dB, higher is better. Weight: the dequantized weight against "
        "the float weight in the same basis. Output (local): the layer's output against the float weight's "
        "on the same inputs, the error this layer adds. Output (end to end): against the float model's "
        "output at this layer, every earlier layer's error included. Click a column header to sort.</p>"
    )
    return depth + size + text + f'<div class="scroll">{_table(_LAYER_COLS, layers, sortable=True)}</div>'


def _range_order(x: dict) -> tuple[float, float]:
    clipped = x["clipped"] if finite(x.get("clipped")) else 0.0
    width = x["high"] - x["low"] if finite(x.get("high")) and finite(x.get("low")) else 0.0
    return (-clipped, -width)


def _clip_note(x: dict) -> str:
    return f"clipped {fmt_pct(x['clipped'])}" if finite(x.get("clipped")) else "clipped: no static range"


def _representable(x: dict) -> str | None:
    lo, hi = interval(x.get("representable"))
    return f"{sig(lo)} .. {sig(hi)}" if x.get("representable") else None


def _ranges(ranges: list, r: dict) -> str:
    order = sorted(ranges, key=_range_order)
    hists = [
        Hist(str(x.get("name")), x.get("hist") or [], x.get("low"), x.get("high"),
             interval(x["representable"]) if x.get("representable") else None, _clip_note(x))
        for x in order[:MAX_HISTOGRAMS]
    ]  # fmt: skip
    title = f"Input histograms, {len(hists)} of {len(order)} layers, most clipped / widest first (log counts)"
    cols: list[Col] = [("layer", "name", str), (">values", "values", fmt_int), (">min", "low", sig)]
    cols += [(">0.1 %", "p001", sig), (">99.9 %", "p999", sig), (">max", "high", sig)]
    cols += [("representable", _representable, str), (">clipped", "clipped", fmt_pct)]
    text = (
        "<p>Green: the input range a static layer's int8 codes represent; values outside it are clipped.</p>"
    )
    grid = plots.histogram_grid("range-histograms", title, hists, columns=6)
    return text + grid + f'<div class="scroll">{_table(cols, order, sortable=True)}</div>'


def _energy(en: dict, r: dict) -> str:
    b, q = en.get("baseline") or {}, en.get("quantized") or {}
    unit = "µJ" if en.get("unit", "uJ") == "uJ" else str(en.get("unit"))
    items = [{"name": name, "b": b.get(k), "q": q.get(k)} for name, k in ENERGY_ROWS]
    measured = en.get("measured")
    if measured:
        items.append(
            {"name": "measured (RAPL)", "b": measured.get("baseline_uj"), "q": measured.get("quantized_uj")}
        )
    cols = [("", "name", str), (f">baseline {unit}", "b", sig), (f">quantized {unit}", "q", sig)]
    cols += [(">baseline / quantized", lambda x: ratio(x["b"], x["q"]), fmt_times)]
    out = f"<p>Estimated energy per {_e(en.get('per', 'inference'))}, in {_e(unit)}.</p>" + _table(
        cols, items
    )
    if not measured:
        why = reason(r, "energy measured", "RAPL energy counters absent")
        out += f'<p class="missing">Measured energy: not measured: {_e(why)}</p>'
    for side, d in (("Baseline", b), ("Quantized", q)):
        macs = ", ".join(f"{k}: {fmt_int(v)}" for k, v in (d.get("macs_per_inference") or {}).items())
        out += f"<h3>{side}</h3><p>MACs per inference: {_e(macs or DASH)}. "
        out += f"Source: {_e(d.get('source', DASH))}.</p>"
        if d.get("assumptions") and (d is b or d.get("assumptions") != b.get("assumptions")):
            out += f"<p>{_e(d['assumptions'])}</p>"
    return out


def _ci_text(key: str, fmt: Callable[[object], str] = sig) -> Callable[[dict], str]:
    return lambda g: fmt_range(*interval(g.get(key)), fmt)


_AUDIT_COLS: list[Col] = [
    ("group", "group", str),
    (">n", "n", fmt_int),
    (">reference", "reference", sig),
    ("95% CI", _ci_text("reference_ci"), str),
    (">quantized", "quantized", sig),
    ("95% CI", _ci_text("quantized_ci"), str),
    (">degradation", "degradation", fmt_signed),
    ("95% CI", _ci_text("degradation_ci", fmt_signed), str),
    (">excess", "excess", fmt_signed),
    (">p-value", "p_value", sig),
    ("flagged", lambda g: "yes" if g.get("flagged") else "no", str),
]


def _audit(a: dict, r: dict) -> str:
    groups, flagged = audit_groups(a), [str(g) for g in a.get("flagged") or []]
    text = (
        f"<p>Groups: {_e(a.get('grouping', DASH))}. Score: {_e(a.get('score', DASH))}. Degradation: "
        "reference minus quantized score, with 95% bootstrap intervals. A group is flagged when it degrades "
        f"more than the other samples: one-sided permutation test ({_e(a.get('permutations', DASH))} "
        f"permutations), p-value Holm-adjusted over the groups and below α = {_e(a.get('alpha', DASH))}. "
        f"Flagged: {_e(', '.join(flagged) or 'none')}.</p>"
    )
    if a.get("overall"):
        text += f"<p>All samples: degradation {_e(fmt_degradation(a['overall']))}.</p>"
    bars = [
        Bar(f"{g.get('group')} (n={g.get('n')})", g.get("degradation"), *interval(g.get("degradation_ci")),
            FLAGGED if g.get("flagged") else None)
        for g in groups[:MAX_AUDIT_BARS]
    ]  # fmt: skip
    title = f"Degradation by group, {len(bars)} of {len(groups)}, worst first (red: flagged)"
    plot = plots.bar_chart("audit-degradation", title, bars, x_title="degradation (reference − quantized)")
    foot = _cells({**a["overall"], "group": "all samples"}, _AUDIT_COLS) if a.get("overall") else ""
    return text + plot + f'<div class="scroll">{_table(_AUDIT_COLS, groups, sortable=True, foot=foot)}</div>'


_PARTS = (
    ("size", "Size", _size),
    ("quality", "Quality", _quality),
    ("speed", "Speed", _speed),
    ("layers", "Layers", _layers),
    ("ranges", "Activation ranges", _ranges),
    ("energy", "Energy (estimate)", _energy),
    ("audit", "Subgroup audit", _audit),
)


def _footer(r: dict) -> str:
    spent = ", ".join(f"{k} {sig(v)} s" for k, v in (r.get("timings_s") or {}).items())
    return (
        f"<footer><p>lowbit {_e(r.get('lowbit_version', DASH))}, {_e(r.get('created', DASH))}. "
        f"Command: <code>{_e(r.get('command') or DASH)}</code>. Time spent: {_e(spent or DASH)}.</p></footer>"
    )


def render_html(report: dict) -> str:
    """The report as one self-contained HTML page (no network, no external files), as a string."""
    title = str(report.get("title") or "lowbit report")
    parts = [_section("summary", "Summary", _summary(report))]
    for key, name, build in _PARTS:
        data = report.get(key)
        parts.append(_section(key, name, build(data, report) if data else _missing(report, key)))
    lines = not_measured_lines(report)
    items = "".join(f"<li>{_e(x)}</li>" for x in lines)
    parts.append(
        _section("not-measured", "Not measured", f"<ul>{items}</ul>" if lines else "<p>Nothing.</p>")
    )
    nav = "".join(f'<a href="#{s}">{s.replace("-", " ")}</a>' for s in SECTIONS)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f'<pre id="script-errors"></pre><script>{_ERRORS_JS}</script>'
        f"<header><h1>{_e(title)}</h1><nav>{nav}</nav></header><main>{''.join(parts)}</main>"
        f"{_footer(report)}<script>{_SORT_JS}</script></body></html>\n"
    )
