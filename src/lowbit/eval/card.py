"""The numbers of a lowbit report (the JSON-able dict of ``lowbit report``) as text: the number formats
shared with the HTML page (``lowbit.eval.html``), and ``render_model_card(report)``, a Hugging Face style
``MODEL_CARD.md`` (markdown with YAML front matter).

Formats: bytes in decimal KB / MB / GB (10^3, 10^6, 10^9) with 3 significant digits, SQNR in dB with one
decimal, other numbers with 3 significant digits, intervals as "value [low, high]" (95%); a missing, NaN
or infinite number is a dash. A part of the report that is None reads "not measured: <reason>", the
reason taken from the report's ``not_measured`` lines ("<part>: <reason>").
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence

from lowbit.eval.plots import finite

PARTS = ("size", "quality", "speed", "layers", "ranges", "energy", "audit")
DASH = "—"


def sig(v: object, digits: int = 3) -> str:
    """``v`` with ``digits`` significant digits (thousands separated from 10^digits up, an exponent
    below 1e-4); None, NaN and inf give a dash."""
    if not finite(v):
        return DASH
    if v == 0:
        return "0"
    if abs(v) >= 10**digits:
        return f"{v:,.0f}"
    if abs(v) < 1e-4:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{max(0, digits - 1 - math.floor(math.log10(abs(v))))}f}"


def fmt_bytes(v: object) -> str:
    """Bytes in B, KB, MB or GB (powers of 1000), 3 significant digits: ``75.0 MB``."""
    if not finite(v):
        return DASH
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(v) >= scale:
            return f"{sig(v / scale)} {unit}"
    return f"{v:.0f} B"


def fmt_db(v: object) -> str:
    return f"{v:.1f} dB" if finite(v) else DASH


def fmt_pct(fraction: object) -> str:
    return f"{sig(fraction * 100)} %" if finite(fraction) else DASH


def fmt_int(v: object) -> str:
    return f"{v:,.0f}" if finite(v) else DASH


def fmt_signed(v: object) -> str:
    return ("+" if finite(v) and v > 0 else "") + sig(v)


def fmt_times(v: object) -> str:
    return f"{sig(v)}×" if finite(v) else DASH


def ratio(num: object, den: object) -> float | None:
    return num / den if finite(num) and finite(den) and den != 0 else None


def interval(ci: object) -> tuple[object, object]:
    return (ci[0], ci[1]) if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None)


def fmt_ci(value: object, low: object, high: object, fmt: Callable[[object], str] = sig) -> str:
    """``value [low, high]``, or ``value`` alone when the interval is missing."""
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]" if finite(low) and finite(high) else fmt(value)


def fmt_range(low: object, high: object, fmt: Callable[[object], str] = sig) -> str:
    """``[low, high]``, or a dash when either end is missing."""
    return f"[{fmt(low)}, {fmt(high)}]" if finite(low) and finite(high) else DASH


def speedup(row: dict) -> float | None:
    """Quantized over baseline for rates (units ending in "/s"), baseline over quantized for times."""
    b, q = row.get("baseline"), row.get("quantized")
    return ratio(q, b) if str(row.get("unit", "")).endswith("/s") else ratio(b, q)


# Other names a ``not_measured`` line may give a part by (before its ":"; "X and Y" names X and Y).
ALIASES = {
    "audit": ("audit", "subgroup audit"),
    "layers": ("layers", "per-layer errors", "layer errors"),
    "energy measured": ("energy measured", "measured energy"),
    "speed layers": ("speed layers", "per-layer speed"),
}


def reason(report: dict, key: str, default: str = "not in this report") -> str:
    """The reason ``report["not_measured"]`` gives for part ``key``: the text after the ":" of the first
    line naming it (by ``key`` or an alias in ``ALIASES``), else ``default``."""
    names = ALIASES.get(key, (key,))
    for line in report.get("not_measured") or []:
        head, _, rest = str(line).partition(":")
        if any(part.strip() in names for part in re.split(r",| and ", head)):
            return rest.strip() or str(line)
    return default


ENERGY_ROWS = (("compute", "compute_uj"), ("weights", "weights_uj"), ("activations", "activations_uj"))
ENERGY_ROWS += (("total", "total_uj"),)


def audit_groups(a: dict) -> list[dict]:
    """The groups, worst (largest degradation) first, groups without a degradation last."""
    return sorted(
        a.get("groups") or [], key=lambda g: -g["degradation"] if finite(g.get("degradation")) else math.inf
    )


def not_measured_lines(r: dict) -> list[str]:
    """The report's ``not_measured`` lines, plus one for each missing part they do not name."""
    lines = [str(x) for x in r.get("not_measured") or []]
    return lines + [f"{k}: not in this report" for k in PARTS if not r.get(k) and not reason(r, k, "")]


def _md(v: object) -> str:
    """``v`` as one line of markdown text: HTML brackets as entities (cards render HTML), ``|`` escaped."""
    text = str(DASH if v is None else v).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; a header starting with ">" is a right-aligned column."""
    lines = ["| " + " | ".join(_md(h.lstrip(">")) for h in head) + " |"]
    lines.append("|" + "|".join("---:" if h.startswith(">") else "---" for h in head) + "|")
    return "\n".join(lines + ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows])


def _card_size(s: dict, r: dict) -> str:
    base, quant = s.get("baseline_components") or {}, s.get("components") or {}
    rows = [("total", fmt_bytes(s.get("baseline_bytes")), fmt_bytes(s.get("quantized_bytes")))]
    rows += [(k, fmt_bytes(base.get(k)), fmt_bytes(quant.get(k))) for k in dict.fromkeys([*quant, *base])]
    return (
        f"Compression {fmt_times(s.get('compression'))}, {sig(s.get('bits_per_weight'))} bits per weight "
        "(stored bytes, KB/MB in powers of 1000).\n\n" + _md_table(["part", ">baseline", ">quantized"], rows)
    )


def _card_quality(q: dict, r: dict) -> str:
    better = "higher" if q.get("higher_is_better") else "lower"
    unit = f" ({_md(q['unit'])})" if q.get("unit") else ""
    text = (
        f"{_md(q.get('task'))}: {_md(q.get('metric'))}{unit}, {better} is better, on "
        f"{_md(q.get('samples'))} {_md(q.get('sample_unit', 'samples'))}; intervals are 95%.\n\n"
    )
    items = [{"name": x.get("model"), **x} for x in q.get("rows") or []]
    items += [{"name": "quantized − baseline", **q["delta"], "signed": True}] if q.get("delta") else []
    items += q.get("extra") or []
    rows = []
    for x in items:
        fmt = fmt_signed if x.get("signed") else sig
        rows.append((x.get("name"), fmt(x.get("value")), fmt_range(x.get("low"), x.get("high"), fmt)))
    return text + _md_table(["", ">value", ">95% interval"], rows)


def _card_speed(s: dict, r: dict) -> str:
    rows = [
        (x.get("name"), x.get("unit"), sig(x.get("baseline")), sig(x.get("quantized")), fmt_times(speedup(x)))
        for x in s.get("rows") or []
    ]
    head = ["", "unit", ">baseline", ">quantized", ">speed-up"]
    return f"{_md(s.get('threads'))} CPU threads.\n\n" + _md_table(head, rows)


def _card_energy(en: dict, r: dict) -> str:
    b, q = en.get("baseline") or {}, en.get("quantized") or {}
    rows = [(name, sig(b.get(k)), sig(q.get(k))) for name, k in ENERGY_ROWS]
    measured = en.get("measured")
    if measured:
        rows.append(("measured (RAPL)", sig(measured.get("baseline_uj")), sig(measured.get("quantized_uj"))))
    out = f"Microjoules per {_md(en.get('per', 'inference'))}, estimated from counted operations.\n\n"
    out += _md_table(["", ">baseline", ">quantized"], rows) + "\n\n"
    out += f"Source: {_md(b.get('source') or q.get('source'))}. Assumptions: {_md(b.get('assumptions'))}."
    if not measured:
        why = reason(r, "energy measured", "RAPL counters absent")
        out += f"\n\nMeasured energy: not measured ({_md(why)})."
    return out


def fmt_degradation(g: dict) -> str:
    """An audit group's degradation and its interval: ``+0.05 [+0.04, +0.06]``."""
    return fmt_ci(g.get("degradation"), *interval(g.get("degradation_ci")), fmt_signed)


def _card_audit(a: dict, r: dict) -> str:
    flagged = [g for g in audit_groups(a) if g.get("flagged")]
    out = (
        f"Per {_md(a.get('grouping'))}, score: {_md(a.get('score'))}. A group is flagged when quantization "
        "costs it more than the other samples: one-sided permutation test "
        f"({_md(a.get('permutations'))} permutations), Holm-adjusted p-value below {_md(a.get('alpha'))}. "
        "A flagged group is where this model serves users worse than the baseline does; check it before use."
    )
    if not flagged:
        return out + "\n\nNo group is flagged."
    rows = [(g.get("group"), fmt_int(g.get("n")), fmt_degradation(g), sig(g.get("p_value"))) for g in flagged]
    return out + "\n\n" + _md_table(["flagged group", ">n", ">degradation [95%]", ">p-value"], rows)


_CARD_PARTS = (
    ("size", "Size", _card_size),
    ("quality", "Quality", _card_quality),
    ("speed", "Speed", _card_speed),
    ("energy", "Energy (estimate)", _card_energy),
    ("audit", "Subgroup audit", _card_audit),
)


def _card_details(r: dict) -> list[str]:
    m = r.get("model") or {}
    front = ["---", "library_name: lowbit"]
    front += [f"base_model: {json.dumps(str(m['baseline']))}"] if m.get("baseline") else []
    front += ["tags:"]
    front += [f"- {json.dumps(str(t))}" for t in ("lowbit", "quantized", m.get("scheme")) if t]
    details = [
        ("Base model", m.get("baseline")), ("Kind", m.get("kind")), ("Quantization scheme", m.get("scheme")),
        ("Method", m.get("method")), ("Layers quantized", m.get("layers_quantized")),
        ("Parameters", fmt_int(m.get("parameters"))), ("lowbit version", r.get("lowbit_version")),
        ("Date", r.get("created")),
    ]  # fmt: skip
    bullets = "\n".join(f"- **{k}:** {_md(v)}" for k, v in details)
    return [
        "\n".join(front + ["---"]),
        f"# {_md(r.get('title') or 'lowbit model')}",
        "## Model details",
        bullets,
    ]


def render_model_card(report: dict) -> str:
    """The report as a Hugging Face style model card (``MODEL_CARD.md``, markdown with YAML front matter)."""
    parts = _card_details(report)
    for key, heading, build in _CARD_PARTS:
        data = report.get(key)
        parts += [
            f"## {heading}",
            build(data, report) if data else f"Not measured: {_md(reason(report, key))}.",
        ]
    lines = not_measured_lines(report)
    parts += ["## Not measured", "\n".join(f"- {_md(x)}" for x in lines) or "Nothing."]
    command = report.get("command")
    parts += ["## How to reproduce", f"```sh\n{command}\n```" if command else "The command was not recorded."]
    return "\n\n".join(parts) + "\n"
