"""The rendered report.html opened in a real headless Chromium (file://, no network): after its scripts ran,
every plot and table is in the DOM, no script raised, the layers table sorts on a header click, and a
screenshot comes out as a PNG.

Chromium missing: skipped, unless ``LOWBIT_REQUIRE_BROWSER=1`` (``make test`` sets it; ``make browser``
installs Debian's chromium). ``LOWBIT_SCREENSHOT=<path>``: the screenshot is also written there.
"""

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from report_fixture import sample_report, sparse_report

from lowbit.eval.html import PLOTS, SECTIONS, render_html

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]
# Appended to a copy of the page: clicks the layers table's "bytes" header twice and records the first
# layer after each click (ascending, then descending) and the header's aria-sort.
SORT_CHECK = """<script>
var table = document.querySelector('#layers table[data-sortable]');
var th = Array.prototype.find.call(table.tHead.rows[0].cells, function (c) {
  return c.textContent === 'bytes';
});
var first = function () { return table.tBodies[0].rows[0].cells[0].textContent; };
th.click(); document.body.dataset.ascending = first();
th.click(); document.body.dataset.descending = first();
document.body.dataset.ariaSort = th.getAttribute('aria-sort');
</script>"""


def _chromium() -> str:
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None
    )
    if found:
        return found
    if os.environ.get("LOWBIT_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium is not installed and LOWBIT_REQUIRE_BROWSER=1 (`make browser` installs it)")
    pytest.skip(
        "chromium is not installed (`make browser` installs it; LOWBIT_REQUIRE_BROWSER=1 fails instead)"
    )


def _run(tmp: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    """Chromium on ``page`` with a fresh profile under ``tmp``; its stdout and stderr as text."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [_chromium(), *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _dom(tmp: Path, page: Path) -> tuple[str, str]:
    """The DOM after the page's scripts ran (serialized), and Chromium's log."""
    done = _run(tmp, page, "--virtual-time-budget=2000", "--dump-dom")
    return done.stdout, done.stderr


def _assert_clean(dom: str, log: str) -> None:
    errors = re.search(r'<pre id="script-errors">(.*?)</pre>', dom, flags=re.S)
    assert errors and errors.group(1) == "", errors.group(1) if errors else "no #script-errors"
    assert not re.search(r"<body[^>]*data-errors", dom)
    assert "Uncaught" not in log, [line for line in log.splitlines() if "Uncaught" in line]


def _section(dom: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', dom, flags=re.S)
    assert match, f"no section {sid} in the DOM"
    return match.group(1)


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("report")
    page = render_html(sample_report())
    out = {"report": tmp / "report.html", "sorted": tmp / "sorted.html", "sparse": tmp / "sparse.html"}
    out["report"].write_text(page, encoding="utf-8")
    out["sorted"].write_text(page.replace("</body>", SORT_CHECK + "</body>"), encoding="utf-8")
    out["sparse"].write_text(render_html(sparse_report()), encoding="utf-8")
    return out


def test_report_in_chromium(pages, tmp_path):
    dom, log = _dom(tmp_path, pages["report"])
    _assert_clean(dom, log)
    for plot in PLOTS:
        assert f'data-plot="{plot}"' in dom, plot
    for sid in SECTIONS[:-1]:
        assert "<table" in _section(dom, sid), sid
    assert "<li>" in _section(dom, "not-measured")
    assert re.search(r'<table data-sortable="ready">', _section(dom, "layers"))
    assert 'data-sortable="pending"' not in dom  # every sortable table was bound


def test_layers_table_sorts_on_click(pages, tmp_path):
    dom, log = _dom(tmp_path, pages["sorted"])
    _assert_clean(dom, log)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-ascending="model.layers.0.self_attn.q_proj"' in body  # the smallest, first of its ties
    assert 'data-descending="model.embed_tokens"' in body
    assert 'data-aria-sort="descending"' in body


def test_sparse_report_in_chromium(pages, tmp_path):
    dom, log = _dom(tmp_path, pages["sparse"])
    _assert_clean(dom, log)
    assert "not measured: skipped (--no-quality)" in _section(dom, "quality")


def test_screenshot(pages, tmp_path):
    shot = tmp_path / "report.png"
    _run(tmp_path, pages["report"], f"--screenshot={shot}", "--window-size=1280,1800")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert struct.unpack(">II", data[16:24]) == (1280, 1800)  # IHDR width, height
    if os.environ.get("LOWBIT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["LOWBIT_SCREENSHOT"])
