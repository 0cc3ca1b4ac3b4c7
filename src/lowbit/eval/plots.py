"""Small SVG plots for the HTML report, without dependencies: each function returns one ``<svg>`` string
with a ``data-plot`` attribute (the plot's id), a title, axes with tick labels and axis titles.

Sizes are in CSS pixels (the ``viewBox``; the page may scale the plot down). Values that are None, NaN or
infinite are skipped; a plot left without a single value shows a "no data" note instead. Every string
passes through ``html.escape``: labels may hold ``<`` or ``&``. Hovering a point or bar shows its label and
value (an SVG ``<title>``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")
FLAGGED = "#d62728"
Fmt = Callable[[float], str]


@dataclass(frozen=True)
class Bar:
    """One bar of ``bar_chart``: ``value`` and an optional interval ``low``..``high`` (a whisker)."""

    label: str
    value: float | None
    low: float | None = None
    high: float | None = None
    color: str | None = None


@dataclass(frozen=True)
class Hist:
    """One cell of ``histogram_grid``: ``counts`` of equal bins over [``low``, ``high``]; ``shade``: a range
    (lo, hi) drawn behind the bars (e.g. what a layer's int8 codes can represent); ``note``: a second line."""

    label: str
    counts: Sequence[float]
    low: float
    high: float
    shade: tuple[float, float] | None = None
    note: str = ""


def finite(v: object) -> bool:
    """True for an int or float that is neither NaN nor infinite (bools excluded)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def tick_label(v: float) -> str:
    """A tick value with 3 significant digits, exponents shortened (``1e6``, ``2.5e-4``)."""
    if v == 0:
        return "0"
    text = f"{v:.3g}"
    return text.replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


@dataclass(frozen=True)
class _Scale:
    """Maps data values in [lo, hi] (log10 of them when ``log``) linearly onto pixels [p0, p1]."""

    lo: float
    hi: float
    p0: float
    p1: float
    log: bool = False

    def __call__(self, v: float) -> float:
        f = math.log10 if self.log else float
        lo, hi = f(self.lo), f(self.hi)
        return self.p0 + (f(v) - lo) / (hi - lo) * (self.p1 - self.p0)

    def ticks(self) -> list[float]:
        if self.log:
            a, b = round(math.log10(self.lo)), round(math.log10(self.hi))
            if b - a <= 2:  # few decades: 1, 2, 5 x 10^k
                return [m * 10.0**k for k in range(a, b + 1) for m in (1, 2, 5) if m * 10.0**k <= self.hi]
            return [10.0**k for k in range(a, b + 1, max(1, math.ceil((b - a) / 6)))]
        step = _nice_step(self.hi - self.lo)
        first = math.ceil(self.lo / step - 1e-9)
        return [k * step for k in range(first, int(math.floor(self.hi / step + 1e-9)) + 1)]


def _nice_step(span: float, n: int = 5) -> float:
    raw = span / n
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def _scale(values: Sequence[float], p0: float, p1: float, log: bool = False, zero: bool = False) -> _Scale:
    """A scale over the finite ``values`` (positive ones when ``log``), widened to round tick values;
    ``zero``: the domain includes 0."""
    vals = [v for v in values if finite(v) and (v > 0 or not log)]
    if log:
        lo, hi = (min(vals), max(vals)) if vals else (1.0, 10.0)
        lo, hi = 10.0 ** math.floor(math.log10(lo)), 10.0 ** math.ceil(math.log10(hi))
        return _Scale(lo, hi if hi > lo else lo * 10, p0, p1, log=True)
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo)
    return _Scale(math.floor(lo / step) * step, math.ceil(hi / step) * step, p0, p1)


def _svg(plot_id: str, title: str, width: float, height: float, body: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" data-plot="{_esc(plot_id)}" width="{width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
        f'aria-label="{_esc(title)}" font-family="sans-serif" font-size="11">'
        f"<title>{_esc(title)}</title>"
        f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="13" font-weight="bold">'
        f"{_esc(title)}</text>{body}</svg>"
    )


def no_data(plot_id: str, title: str, note: str = "no data", width: float = 720) -> str:
    """A plot frame holding only its title and ``note``."""
    body = f'<text x="{width / 2:.0f}" y="44" text-anchor="middle" fill="#666">{_esc(note)}</text>'
    return _svg(plot_id, title, width, 60, body)


def _x_axis(sx: _Scale, y: float, y_top: float, title: str, fmt: Fmt) -> str:
    out = [f'<line x1="{sx.p0:.1f}" x2="{sx.p1:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#333"/>']
    for t in sx.ticks():
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y_top:.1f}" y2="{y:.1f}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{x:.1f}" y="{y + 14:.1f}" text-anchor="middle">{_esc(fmt(t))}</text>')
    mid = (sx.p0 + sx.p1) / 2
    out.append(f'<text x="{mid:.1f}" y="{y + 30:.1f}" text-anchor="middle">{_esc(title)}</text>')
    return "".join(out)


def _y_axis(sy: _Scale, x: float, x_right: float, title: str, fmt: Fmt) -> str:
    out = [f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{sy.p0:.1f}" y2="{sy.p1:.1f}" stroke="#333"/>']
    for t in sy.ticks():
        y = sy(t)
        out.append(f'<line x1="{x:.1f}" x2="{x_right:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{x - 5:.1f}" y="{y + 4:.1f}" text-anchor="end">{_esc(fmt(t))}</text>')
    mid = (sy.p0 + sy.p1) / 2
    out.append(
        f'<text x="14" y="{mid:.1f}" text-anchor="middle" transform="rotate(-90 14 {mid:.1f})">'
        f"{_esc(title)}</text>"
    )
    return "".join(out)


def _legend(names: Sequence[str], colors: Sequence[str], x: float, y: float) -> str:
    out = []
    for name, color in zip(names, colors, strict=True):
        out.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{x + 14:.1f}" y="{y:.1f}">{_esc(name)}</text>')
        x += 24 + 6.5 * len(name)
    return "".join(out)


def line_chart(
    plot_id: str,
    title: str,
    series: Mapping[str, Sequence[float | None]],
    *,
    labels: Sequence[str] | None = None,
    x_title: str = "layer index",
    y_title: str = "",
    width: float = 720,
    height: float = 300,
) -> str:
    """Several series over x = 0, 1, 2, ... (the index of each value); ``labels[i]`` names x = i on hover.

    Missing values break a series' line; a point alone is still drawn (a dot).
    """
    ys = [v for vs in series.values() for v in vs if finite(v)]
    if not ys:
        return no_data(plot_id, title, width=width)
    sx = _scale([0, max(max(len(vs) for vs in series.values()) - 1, 1)], 60, width - 35)
    sy = _scale(ys, height - 45, 40)
    out = [
        _x_axis(sx, height - 45, 40, x_title, tick_label),
        _y_axis(sy, 60, width - 35, y_title, tick_label),
    ]
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(series))]
    for (name, values), color in zip(series.items(), colors, strict=True):
        out.append(_series(name, values, color, sx, sy, labels))
    out.append(_legend(list(series), colors, 70, 34))
    return _svg(plot_id, title, width, height, "".join(out))


def _series(
    name: str, values: Sequence, color: str, sx: _Scale, sy: _Scale, labels: Sequence[str] | None
) -> str:
    """One series of ``line_chart``: a polyline per run of finite values, a dot (with a tooltip) per value."""
    out, run = [], []
    for i, v in enumerate([*values, None]):
        if finite(v):
            run.append(f"{sx(i):.1f},{sy(v):.1f}")
            label = labels[i] if labels is not None and i < len(labels) else f"x = {i}"
            out.append(
                f'<circle cx="{sx(i):.1f}" cy="{sy(v):.1f}" r="2.2" fill="{color}">'
                f"<title>{_esc(f'{label}: {name} {tick_label(v)}')}</title></circle>"
            )
            continue
        if len(run) > 1:
            out.insert(0, f'<polyline fill="none" stroke="{color}" points="{" ".join(run)}"/>')
        run = []
    return "".join(out)


def bar_chart(
    plot_id: str,
    title: str,
    bars: Sequence[Bar],
    *,
    x_title: str = "",
    fmt: Fmt = tick_label,
    width: float = 720,
    label_width: float = 210,
) -> str:
    """Horizontal bars from 0 to each value, top to bottom in the given order, each with its interval as a
    whisker when ``low`` and ``high`` are given; a bar without a value shows "no data" on its row."""
    if not any(finite(b.value) for b in bars):
        return no_data(plot_id, title, width=width)
    row, top = 20, 30
    height = top + row * len(bars) + 45
    ends = [v for b in bars for v in (b.value, b.low, b.high)]
    sx = _scale(ends, label_width, width - 20, zero=True)
    bottom = top + row * len(bars)
    out = [_x_axis(sx, bottom, top, x_title, fmt)]
    for k, b in enumerate(bars):
        y = top + k * row
        tip = f"{b.label}: {fmt(b.value) if finite(b.value) else 'no data'}"
        out.append(
            f'<text x="{label_width - 6:.1f}" y="{y + 14:.1f}" text-anchor="end">'
            f"{_esc(_short(b.label, 32))}<title>{_esc(b.label)}</title></text>"
        )
        if not finite(b.value):
            out.append(f'<text x="{sx(0) + 4:.1f}" y="{y + 14:.1f}" fill="#666">no data</text>')
            continue
        x0, x1 = sorted((sx(0), sx(b.value)))
        if finite(b.low) and finite(b.high):
            tip += f" [{fmt(b.low)}, {fmt(b.high)}]"
        color = b.color or PALETTE[0]
        out.append(
            f'<rect x="{x0:.1f}" y="{y + 4:.1f}" width="{max(x1 - x0, 0.5):.1f}" height="{row - 8}" '
            f'fill="{_esc(color)}"><title>{_esc(tip)}</title></rect>'
        )
        if finite(b.low) and finite(b.high):
            out.append(_whisker(sx(b.low), sx(b.high), y + row / 2))
    return _svg(plot_id, title, width, height, "".join(out))


def _whisker(x0: float, x1: float, y: float) -> str:
    return (
        f'<path d="M{x0:.1f},{y:.1f}H{x1:.1f}M{x0:.1f},{y - 5:.1f}V{y + 5:.1f}M{x1:.1f},{y - 5:.1f}'
        f'V{y + 5:.1f}" stroke="#222" stroke-width="1.3" fill="none"/>'
    )


def histogram_grid(
    plot_id: str,
    title: str,
    hists: Sequence[Hist],
    *,
    columns: int = 4,
    cell_width: float = 175,
    cell_height: float = 120,
) -> str:
    """Small multiples, ``columns`` per row: each cell one histogram, bar heights on a log scale
    (log(1 + count)) so that sparse tails stay visible, ``shade`` as a green band, its x axis from
    ``low`` to ``high`` with those two values as tick labels (and 0 when inside)."""
    if not hists:
        return no_data(plot_id, title, width=columns * cell_width)
    rows = math.ceil(len(hists) / columns)
    width, height = columns * cell_width, 28 + rows * cell_height
    cells = []
    for k, h in enumerate(hists):
        x, y = (k % columns) * cell_width, 28 + (k // columns) * cell_height
        cells.append(
            f'<g transform="translate({x:.0f},{y:.0f})">{_hist_cell(h, cell_width, cell_height)}</g>'
        )
    return _svg(plot_id, title, width, height, "".join(cells))


def _hist_cell(h: Hist, width: float, height: float) -> str:
    head = (
        f'<text x="6" y="11">{_esc(_short(h.label, 27))}<title>{_esc(h.label)}</title></text>'
        f'<text x="6" y="23" fill="#555">{_esc(h.note)}</text>'
    )
    counts = [c if finite(c) and c > 0 else 0 for c in h.counts]
    if not (finite(h.low) and finite(h.high) and h.high > h.low and any(counts)):
        return head + '<text x="6" y="50" fill="#666">no data</text>'
    sx = _Scale(h.low, h.high, 8, width - 10)
    base, top = height - 28, 30
    out = [head]
    if h.shade is not None and all(finite(v) for v in h.shade):
        lo, hi = max(h.shade[0], h.low), min(h.shade[1], h.high)
        if hi > lo:
            out.append(
                f'<rect x="{sx(lo):.1f}" y="{top}" width="{sx(hi) - sx(lo):.1f}" height="{base - top}" '
                f'fill="#2ca02c" opacity="0.15"><title>representable {_esc(tick_label(h.shade[0]))} .. '
                f"{_esc(tick_label(h.shade[1]))}</title></rect>"
            )
    peak, bw = math.log1p(max(counts)), (sx.p1 - sx.p0) / len(counts)
    for i, c in enumerate(counts):
        if c:
            bh = (base - top) * math.log1p(c) / peak
            out.append(
                f'<rect x="{sx.p0 + i * bw:.1f}" y="{base - bh:.1f}" width="{bw:.2f}" height="{bh:.1f}" '
                f'fill="{PALETTE[0]}"><title>{c:g}</title></rect>'
            )
    out.append(f'<line x1="{sx.p0}" x2="{sx.p1}" y1="{base}" y2="{base}" stroke="#333"/>')
    ticks = [(h.low, "start"), (h.high, "end")] + ([(0.0, "middle")] if h.low < 0 < h.high else [])
    for v, anchor in ticks:
        out.append(
            f'<text x="{sx(v):.1f}" y="{base + 12}" text-anchor="{anchor}">{_esc(tick_label(v))}</text>'
        )
    return "".join(out)


def scatter(
    plot_id: str,
    title: str,
    points: Sequence[tuple[float | None, float | None, str]],
    *,
    x_title: str = "",
    y_title: str = "",
    log_x: bool = False,
    x_fmt: Fmt = tick_label,
    width: float = 720,
    height: float = 320,
) -> str:
    """Points (x, y, label); ``log_x``: x on a log10 scale (points with x <= 0 are skipped)."""
    pts = [(x, y, lab) for x, y, lab in points if finite(x) and finite(y) and (x > 0 or not log_x)]
    if not pts:
        return no_data(plot_id, title, width=width)
    sx = _scale([p[0] for p in pts], 60, width - 35, log=log_x)
    sy = _scale([p[1] for p in pts], height - 45, 30)
    out = [_x_axis(sx, height - 45, 30, x_title, x_fmt), _y_axis(sy, 60, width - 35, y_title, tick_label)]
    for x, y, label in pts:
        tip = f"{label}: {x_fmt(x)}, {tick_label(y)}"
        out.append(
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{PALETTE[0]}" fill-opacity="0.6">'
            f"<title>{_esc(tip)}</title></circle>"
        )
    return _svg(plot_id, title, width, height, "".join(out))


def stacked_bar(
    plot_id: str,
    title: str,
    rows: Sequence[tuple[str, Mapping[str, float | None]]],
    *,
    x_title: str = "",
    fmt: Fmt = tick_label,
    width: float = 720,
    label_width: float = 110,
) -> str:
    """Horizontal bars, one per (label, {component: amount}), each the components end to end, one colour
    per component name across all bars; components that are 0 or missing take no space."""
    keys = list(dict.fromkeys(k for _, parts in rows for k, v in parts.items() if finite(v) and v > 0))
    if not keys:
        return no_data(plot_id, title, width=width)
    color = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}
    totals = [sum(v for v in parts.values() if finite(v) and v > 0) for _, parts in rows]
    row, top = 28, 30
    bottom = top + row * len(rows)
    sx = _scale([0, *totals], label_width, width - 20, zero=True)
    out = [_x_axis(sx, bottom, top, x_title, fmt)]
    for k, (label, parts) in enumerate(rows):
        y, x = top + k * row, 0.0
        out.append(f'<text x="{label_width - 6}" y="{y + 18}" text-anchor="end">{_esc(label)}</text>')
        if not totals[k]:
            out.append(f'<text x="{label_width + 4}" y="{y + 18}" fill="#666">no data</text>')
        for key in keys:
            v = parts.get(key)
            if not (finite(v) and v > 0):
                continue
            out.append(
                f'<rect x="{sx(x):.1f}" y="{y + 5}" width="{sx(x + v) - sx(x):.1f}" height="{row - 10}" '
                f'fill="{color[key]}"><title>{_esc(f"{label}, {key}: {fmt(v)}")}</title></rect>'
            )
            x += v
    out.append(_legend(keys, [color[k] for k in keys], label_width, bottom + 46))
    return _svg(plot_id, title, width, bottom + 56, "".join(out))
