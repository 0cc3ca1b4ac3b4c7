"""The report page and model card (lowbit.eval.html, lowbit.eval.card) and the SVG plots behind them."""

import re
import xml.etree.ElementTree as ET

import pytest
from report_fixture import BASELINE, TITLE, sample_report, sparse_report

from lowbit.eval import plots
from lowbit.eval.card import fmt_bytes, fmt_db, fmt_pct, sig
from lowbit.eval.html import MAX_AUDIT_BARS, MAX_HISTOGRAMS, PLOTS, SECTIONS, render_html, render_model_card

NAN, INF = float("nan"), float("inf")
SVG = "{http://www.w3.org/2000/svg}"  # the namespace of ElementTree's tag names


def _svgs(page: str) -> dict[str, ET.Element]:
    """Every inline SVG of ``page`` parsed as XML (so each is well-formed), by ``data-plot``."""
    out = {}
    for text in re.findall(r"<svg .*?</svg>", page, flags=re.S):
        root = ET.fromstring(text)
        out[root.get("data-plot")] = root
    return out


def _section(page: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', page, flags=re.S)
    assert match, f"no section {sid}"
    return match.group(1)


def _texts(svg: ET.Element) -> list[str]:
    return [t.text or "" for t in svg.iter(f"{SVG}text")]


# --- formats


@pytest.mark.parametrize(
    "value, want",
    [(17.33, "17.3"), (0.91, "0.910"), (366, "366"), (134515008, "134,515,008"), (0, "0"), (-1.17, "-1.17"),
     (2e-5, "2.00e-05"), (None, "—"), (NAN, "—"), (INF, "—")],
    ids=["two-digit", "fraction", "integer", "thousands", "zero", "negative", "tiny", "none", "nan", "inf"],
)  # fmt: skip
def test_sig(value, want):
    assert sig(value) == want


def test_unit_formats():
    assert fmt_bytes(538060800) == "538 MB"
    assert fmt_bytes(75_000_000) == "75.0 MB"
    assert fmt_bytes(1500) == "1.50 KB"
    assert fmt_bytes(12) == "12 B"
    assert fmt_bytes(2.5e9) == "2.50 GB"
    assert fmt_db(22.149) == "22.1 dB"
    assert fmt_pct(0.0002) == "0.0200 %"
    assert fmt_bytes(NAN) == fmt_db(None) == fmt_pct(INF) == "—"


# --- plots


def test_line_chart_skips_missing_values_and_escapes():
    svg = plots.line_chart(
        "p", "A <b> & c", {"w<1>": [1.0, None, NAN, 3.0, 2.0, INF], "o": [None, None]}, labels=list("abcdef")
    )
    root = ET.fromstring(svg)
    assert root.get("data-plot") == "p"
    assert "A <b> & c" in _texts(root)
    circles = list(root.iter(f"{SVG}circle"))
    assert len(circles) == 3  # 1.0, 3.0, 2.0: None, NaN and inf skipped
    assert circles[0].find(f"{SVG}title").text == "a: w<1> 1"
    assert len(list(root.iter(f"{SVG}polyline"))) == 1  # 3.0 - 2.0; 1.0 stands alone
    assert "layer index" in _texts(root)


@pytest.mark.parametrize(
    "svg",
    [
        plots.line_chart("p", "t", {"a": [None, NAN]}),
        plots.bar_chart("p", "t", [plots.Bar("x", None), plots.Bar("y", NAN)]),
        plots.scatter(
            "p", "t", [(0.0, 1.0, "zero on log x"), (NAN, 1.0, "nan"), (1.0, None, "none")], log_x=True
        ),
        plots.stacked_bar("p", "t", [("a", {"x": 0, "y": None, "z": NAN})]),
        plots.histogram_grid("p", "t", []),
    ],
    ids=["line", "bar", "scatter", "stacked", "histograms"],
)
def test_plots_without_data_say_so(svg):
    root = ET.fromstring(svg)
    assert root.get("data-plot") == "p"
    assert "t" in _texts(root) and "no data" in _texts(root)


def test_bar_chart_whiskers_colours_and_missing_bar():
    bars = [
        plots.Bar("bad <group>", 0.3, 0.2, 0.4, plots.FLAGGED),
        plots.Bar("ok", -0.1, -0.15, -0.05),
        plots.Bar("gone", None),
    ]
    root = ET.fromstring(plots.bar_chart("b", "t", bars, x_title="degradation"))
    rects = list(root.iter(f"{SVG}rect"))
    assert [r.get("fill") for r in rects] == [plots.FLAGGED, plots.PALETTE[0]]
    assert rects[0].find(f"{SVG}title").text == "bad <group>: 0.3 [0.2, 0.4]"
    assert len(list(root.iter(f"{SVG}path"))) == 2  # one whisker per interval
    texts = _texts(root)
    assert "no data" in texts and "degradation" in texts and "0" in texts  # the axis crosses 0


def test_histogram_grid_cells():
    hists = [
        plots.Hist("a", [0, 5, 100, 5, 0], -2.0, 3.0, shade=(-1.0, 9.0), note="clipped 1 %"),
        plots.Hist("flat", [1, 2], 1.0, 1.0),  # empty range
        plots.Hist("empty", [0, 0, NAN], -1.0, 1.0),
    ]
    root = ET.fromstring(plots.histogram_grid("h", "t", hists, columns=2))
    texts = _texts(root)
    assert texts.count("no data") == 2
    assert {"a", "clipped 1 %", "-2", "0", "3"} <= set(texts)
    shade = [r for r in root.iter(f"{SVG}rect") if r.get("opacity")]
    assert len(shade) == 1  # clipped to [low, high]
    assert float(root.get("height")) > 2 * 100  # two rows of cells


def test_scatter_log_axis():
    points = [(1e3, 10.0, "a"), (2e5, 20.0, "b"), (-5.0, 30.0, "negative"), (1e4, INF, "inf")]
    root = ET.fromstring(plots.scatter("s", "t", points, x_title="bytes", log_x=True, x_fmt=fmt_bytes))
    assert len(list(root.iter(f"{SVG}circle"))) == 2
    assert {"1.00 KB", "10.0 KB", "100 KB", "1.00 MB"} <= set(_texts(root))


def test_stacked_bar_shares_colours():
    rows = [("baseline", {"float": 100.0}), ("quantized", {"codes": 10.0, "float": 5.0, "tables": 0})]
    root = ET.fromstring(plots.stacked_bar("z", "t", rows))
    fills = {r.findtext(f"{SVG}title"): r.get("fill") for r in root.iter(f"{SVG}rect")}
    assert fills["baseline, float: 100"] == fills["quantized, float: 5"] != fills["quantized, codes: 10"]
    assert "tables" not in _texts(root)  # zero components take no space and no legend entry


# --- the page


def test_page_has_every_section_and_plot():
    page = render_html(sample_report())
    assert page.startswith("<!doctype html>")
    assert re.findall(r'<section id="([^"]+)"', page) == list(SECTIONS)
    svgs = _svgs(page)
    assert set(svgs) == set(PLOTS)
    for sid in SECTIONS[:-1]:
        assert "<table" in _section(page, sid), sid
    assert page.count('data-sortable="pending"') == 4  # layers, ranges, audit, per-layer speed
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    assert len(scripts) == 2 and "window.onerror" in scripts[0] and "data-sortable" in scripts[1]


def test_page_is_self_contained():
    page = render_html(sample_report())
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)|url\(|@import|<link""", page, flags=re.I)


def test_page_escapes_report_strings():
    page = render_html(sample_report())
    assert "<script>alert" not in page
    assert "smollm2&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert f"<title>{TITLE.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}</title>" in page
    assert "Fish &amp; &lt;chips&gt;" in page
    assert "Fish & <chips> (n=23)" in _texts(_svgs(page)["audit-degradation"])


def test_page_numbers():
    page = render_html(sample_report())
    summary = _section(page, "summary")
    for text in ("7.17×", "538 MB → 75.0 MB", "+1.17 [+0.900, +1.40]", "2.76×", "6.97×", "2 of 50"):
        assert text in summary, text
    assert '<td class="num" data-v="1.17">1.17</td>' in _section(page, "quality")
    assert "21.0 dB" in _section(page, "layers")
    energy = _section(page, "energy")
    assert "this machine exposes no RAPL counters" in energy and "Horowitz" in energy


def test_page_caps_and_orders_plots():
    report = sample_report()
    svgs = _svgs(render_html(report))
    notes = [t for t in _texts(svgs["range-histograms"]) if t.startswith("clipped")]
    assert len(notes) == MAX_HISTOGRAMS < len(report["ranges"])
    clipped = [float(t.split()[1]) for t in notes if t != "clipped: no static range"]
    assert clipped == sorted(clipped, reverse=True) and clipped[0] > 0  # worst clipped first
    audit = svgs["audit-degradation"]
    bars = [r for r in audit.iter(f"{SVG}rect")]
    assert len(bars) == MAX_AUDIT_BARS < len(report["audit"]["groups"])
    assert [r.get("fill") for r in bars[:3]] == [plots.FLAGGED, plots.FLAGGED, plots.PALETTE[0]]


def test_sparse_report_says_not_measured():
    page = render_html(sparse_report())
    assert re.findall(r'<section id="([^"]+)"', page) == list(SECTIONS)
    for sid, reason in [("quality", "skipped (--no-quality)"), ("speed", "skipped (--no-speed)"),
                        ("energy", "no calibration data"), ("audit", "no --groups given"),
                        ("layers", "not in this report"), ("ranges", "not in this report")]:  # fmt: skip
        assert f'<p class="missing">not measured: {reason}</p>' in _section(page, sid), sid
    assert set(_svgs(page)) == {"size-components"}
    assert "not measured" in _section(page, "summary")
    nm = _section(page, "not-measured")
    assert "layers: not in this report" in nm and "audit: no --groups given" in nm


def test_minimal_report_renders():
    report = {"format": "lowbit-report", "version": 1, "title": None, "model": {}}
    page = render_html(report)
    assert "lowbit report" in page and re.findall(r'<section id="([^"]+)"', page) == list(SECTIONS)
    assert "Not measured" in render_model_card(report)


def test_nan_and_inf_render_as_dashes():
    report = sample_report()
    report["layers"][1].update(weight_sqnr_db=NAN, output_sqnr_db=INF, bytes=NAN)
    report["quality"]["delta"] = {"value": NAN, "low": None, "high": INF}
    report["ranges"][0].update(hist=[NAN] * 32, clipped=NAN)
    report["audit"]["groups"][0]["degradation"] = NAN
    page = render_html(report)
    _svgs(page)  # still well-formed
    assert not re.search(r"\b(nan|inf)\b", page, flags=re.I)
    assert not re.search(r"\b(nan|inf)\b", render_model_card(report), flags=re.I)


# --- the model card


def test_model_card():
    card = render_model_card(sample_report())
    assert card.startswith("---\nlibrary_name: lowbit\n")
    headings = re.findall(r"^## (.+)$", card, flags=re.M)
    assert headings == ["Model details", "Size", "Quality", "Speed", "Energy (estimate)", "Subgroup audit",
                        "Not measured", "How to reproduce"]  # fmt: skip
    assert "<script>" not in card.split("---", 2)[2]  # HTML in names is escaped below the front matter
    assert f"- **Base model:** {BASELINE.replace('<', '&lt;').replace('>', '&gt;')}" in card
    assert "| quantized − baseline | +1.17 | [+0.900, +1.40] |" in card
    assert "| Article 00 | 20 | +0.350 [+0.330, +0.370] | 0.00100 |" in card
    assert "Measured energy: not measured (this machine exposes no RAPL counters)." in card
    assert "```sh\nlowbit report out/w4 --data wiki:8x512 --out rep\n```" in card


def test_model_card_sparse():
    card = render_model_card(sparse_report())
    assert "## Quality\n\nNot measured: skipped (--no-quality)." in card
    assert "## Subgroup audit\n\nNot measured: no --groups given." in card
    assert "The command was not recorded." in card


def test_reasons_found_by_alias():
    report = sparse_report()
    report["not_measured"] = [
        "subgroup audit and per-layer errors: need the float baseline",
        "measured energy: no RAPL counter",
    ]
    report["energy"] = sample_report()["energy"]
    page = render_html(report)
    for sid in ("audit", "layers"):
        assert "not measured: need the float baseline" in _section(page, sid), sid
    assert "Measured energy: not measured: no RAPL counter" in _section(page, "energy")
    assert "not measured: not in this report" in _section(page, "quality")
    assert "layers: not in this report" not in _section(page, "not-measured")
