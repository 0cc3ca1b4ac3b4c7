"""The few lines ``lowbit report`` prints: headline numbers and where the report is."""

from __future__ import annotations


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _ci(row: dict) -> str:
    return f"{row['value']:.2f} [{row['low']:.2f}, {row['high']:.2f}]"


def summary_lines(r: dict) -> str:
    """Size, quality with intervals, speed, flagged groups and the report path, one line each."""
    lines = [r["title"]]
    s = r.get("size")
    if s:
        comp = "" if s["compression"] is None else f", {s['compression']:.2f}x smaller"
        bpw = (
            "" if s["bits_per_weight"] is None else f", {s['bits_per_weight']:.2f} bits per quantized weight"
        )
        lines.append(f"size: {_mb(s['baseline_bytes'])} -> {_mb(s['quantized_bytes'])}{comp}{bpw}")
    q = r.get("quality")
    if q:
        rows = ", ".join(f"{row['model']} {_ci(row)}" for row in q["rows"])
        lines.append(f"{q['metric']} ({q['samples']} {q['sample_unit']}, 95% intervals): {rows}")
    for row in (r.get("speed") or {}).get("rows", []):
        both = " -> ".join(f"{row[k]:.1f}" for k in ("baseline", "quantized") if row.get(k) is not None)
        lines.append(f"{row['name']}: {both} {row['unit']}")
    a = r.get("audit")
    if a:
        flagged = ", ".join(a["flagged"]) or "none"
        lines.append(f"groups ({a['grouping']}) degraded significantly more than average: {flagged}")
    lines += [f"not measured: {m}" for m in r.get("not_measured", [])]
    lines.append(f"report: {r['path']}/report.html")
    return "\n".join(lines)
