"""comparison.html: built by `vitsweep report`, self-contained, and rendered by a real headless Chromium.

The browser test drives Debian's ``chromium`` (``apt-get install -y chromium``) with playwright's Python
client (``executable_path``; playwright's own browser download is never used). Without either it is
skipped, saying how to install them. It records every request the page makes (only the file itself and
``data:`` URIs are allowed), every console message and page error, checks that the plots rendered as SVG
with every configuration named and the Pareto front drawn, and saves a screenshot in the test's tmp dir.
"""

from __future__ import annotations

import csv
import re
import shutil

import pytest

from orchestrator.cli_sweep import main as sweep_main
from orchestrator.results import collect_trials
from orchestrator.tables import build_rows, row_name
from test_report import _epoch, cfg, make_experiment

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def _infer(latency, img_s, source="analytic"):
    return {"infer/latency_b1_ms": latency, "infer/img_s": img_s, "infer/img_s_batch": 32,
            **{f"infer/peak_mem_b{b}_mb": 4.0 + b * 0.5 for b in (1, 32, 64, 128)}, "infer/mem_source": source,
            "memory/attn_train_analytic_mb": 3.0 + latency / 10}


def _curve(accs, infer=None, last="finished"):
    rows = [_epoch(i + 1, a, status=last if i == len(accs) - 1 else "running") for i, a in enumerate(accs)]
    if infer is not None:
        rows[-1].update(infer)
    return rows


@pytest.fixture
def experiment(tmp_path):
    """Five configurations, two with two seeds (intervals), one errored, inference profiles on the finished ones."""
    return make_experiment(tmp_path, [
        ("t0", cfg("softmax", seed=0), "TERMINATED", _curve([0.3, 0.5], _infer(2.0, 900.0)), None, "finished"),
        ("t1", cfg("softmax", seed=1), "TERMINATED", _curve([0.4, 0.7], _infer(2.2, 880.0)), None, "finished"),
        ("t2", cfg("linformer", rank=8), "TERMINATED", _curve([0.2, 0.55], _infer(1.5, 1200.0)), None, "finished"),
        ("t3", cfg("performer", features=16, seed=0), "TERMINATED", _curve([0.2, 0.4], _infer(1.2, 1500.0)), None,
         "finished"),
        ("t4", cfg("performer", features=16, seed=1), "TERMINATED", _curve([0.25, 0.45], _infer(1.3, 1400.0)), None,
         "finished"),
        ("t5", cfg("nystrom", landmarks=8), "ERROR", _curve([0.2], last="running"), "RuntimeError: boom", None),
    ])


def test_report_writes_the_inference_columns_and_a_self_contained_page(experiment):
    assert sweep_main(["report", str(experiment)]) == 0
    with (experiment / "comparison.csv").open() as fh:
        rows = {r["label"]: r for r in csv.DictReader(fh)}
    infer = [c for c in next(iter(rows.values())) if "infer" in c]
    assert infer == ["infer_latency_b1_ms", "infer_img_s", "infer_img_s_batch", "infer_peak_mem_b1_mb",
                     "infer_peak_mem_b32_mb", "infer_peak_mem_b64_mb", "infer_peak_mem_b128_mb", "infer_mem_source"]
    assert float(rows["softmax"]["infer_latency_b1_ms"]) == pytest.approx(2.1)  # mean over the two seeds
    assert rows["softmax"]["infer_mem_source"] == "analytic" and rows["nystrom"]["infer_latency_b1_ms"] == ""
    md = (experiment / "comparison.md").read_text()
    assert "infer latency b1 (ms)" in md and "infer img/s (batch)" in md and "infer peak mem b64 (MB)" in md
    assert "| 2.10 | 890.0 (b32) |" in md and "comparison.html" in md

    page = (experiment / "comparison.html").read_text()
    assert len(page) > 1_000_000  # plotly.js is inside
    # nothing is loaded from elsewhere: no external script, stylesheet, image or frame
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)\s*=\s*[\"']?(https?:)?//", page, re.I)
    assert "mathjax" not in page.split("</head>")[0].lower()
    for row in build_rows(collect_trials(experiment)):
        assert row_name(row) in page


def _browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    executable = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if executable is None:
        pytest.skip("no headless Chromium on this machine: install Debian's chromium (apt-get install -y chromium)")
    return sync_api, executable


def test_the_page_renders_in_headless_chromium_offline(experiment, tmp_path):
    sync_api, executable = _browser()
    assert sweep_main(["report", str(experiment)]) == 0
    page_path = (experiment / "comparison.html").resolve()
    names = [row_name(r) for r in build_rows(collect_trials(experiment)) if r.values["acc1"][0] is not None
             and not r.values["status"].startswith("errored")]
    requests, problems = [], []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
                    else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(page_path.as_uri(), wait_until="load")
            page.wait_for_selector("#pareto .main-svg", timeout=30_000)
            page.wait_for_selector("#curves .main-svg", timeout=30_000)
            svg_text = page.evaluate("Array.from(document.querySelectorAll('#pareto svg text')).map(t => t.textContent)")
            curve_text = page.evaluate("Array.from(document.querySelectorAll('#curves svg text')).map(t => t.textContent)")
            points = page.evaluate("document.querySelectorAll('#pareto .scatterlayer .trace .points path').length")
            fronts = page.evaluate("document.querySelectorAll('#pareto .scatterlayer .trace .js-line').length")
            page.click("#comparison th:nth-child(4)")  # sort by val acc@1
            first = page.evaluate("document.querySelector('#comparison tbody tr td').textContent")
            page.screenshot(path=str(tmp_path / "comparison.png"), full_page=True)
        finally:
            browser.close()
    assert not problems, problems
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    for name in names:
        assert name in svg_text, f"{name!r} not in the Pareto legend"
        assert name in curve_text, f"{name!r} not in the learning curves' legend"
    assert "Pareto front" in svg_text
    assert points >= 4 * len(names)  # every configuration in every panel (plus the fronts' rings)
    assert fronts >= 4  # one dashed front per panel
    assert first == "nystrom m=8"  # ascending: the lowest acc@1 first (the errored trial's last epoch)
    assert (tmp_path / "comparison.png").stat().st_size > 20_000


def test_configuration_text_cannot_inject_markup(tmp_path):
    """A configuration's text (here a data spec that varies across trials) is escaped in the table, the
    plots' JSON and the embedded rows: no element of the page comes from it."""
    hostile = "synthetic:</script><img src=x onerror=alert(1)>"
    exp = make_experiment(tmp_path, [
        ("t0", {**cfg("softmax", epochs=2), "data": hostile}, "TERMINATED", _curve([0.3, 0.5], _infer(2.0, 900.0)),
         None, "finished"),
        ("t1", {**cfg("softmax", epochs=2), "data": "synthetic"}, "TERMINATED", _curve([0.3, 0.6], _infer(2.0, 900.0)),
         None, "finished"),
    ])
    assert sweep_main(["report", str(exp)]) == 0
    page = (exp / "comparison.html").read_text()
    assert "<img src=x" not in page and "onerror=alert(1)>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page  # shown, as text
