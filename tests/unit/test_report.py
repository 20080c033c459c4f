"""The operator's report and the public page: rendered from hand-made ledger data, then
loaded in a real headless Chromium (tests/browser.py), which must draw every chart without a
console error; the screenshots land in benchmarks/results/ for the README."""

import functools
import re
from pathlib import Path

import pytest

from serve_app.economics.page import render_page
from serve_app.economics.report import render_report
from tests.browser import load

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
DAY_S = 86400.0
START = 1764547200.0  # 2025-12-01 00:00 UTC
HOSTILE = '<script>alert("x")</script>&'
ESCAPED = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;"
REPORT_CHARTS = ["profit", "replicas", "requests-1", "latency-1", "error-budget-1",
                 "requests-6", "latency-6", "error-budget-6"]


def day(netuid: int, i: int, *, economics: bool = True, **fields) -> dict:
    """A day row in the ledger's shape, with plausible figures that wobble from day to day."""
    accepted, late, failed = 1000 + 37 * (i % 5), 6 + i % 4, 2 + i % 3
    met = i % 6 != 4
    row = {
        "netuid": netuid, "day": 20423 + i, "start": START + i * DAY_S,
        "label": f"2025-12-{i + 1:02d}", "requests": accepted + late + failed + 90,
        "admitted": accepted + late + failed, "answered": accepted + late, "accepted": accepted, "late": late,
        "failed": failed, "refused": {"rate_limited": 60, "not_registered": 30}, "egress_bytes": 123456,
        "availability": 0.999 if met else 0.9909, "latency_attainment": 0.995, "error_budget_used": 0.4 if met else 1.8,
        "p95_s": 0.030 + 0.004 * (i % 4) if met else 1.4, "slo_latency_s": 1.0, "uptime": 0.999,
        "slo_met": met, "misses": [] if met else ["availability 0.9909 < 0.995"],
        "incentive": 0.12, "tao_per_day": 0.8,
        "revenue": 3.2 + 0.1 * i if economics else None, "cost": 1.1 if economics else None,
        "profit": 2.1 + 0.1 * i if economics else None,
        "replicas": {"embeddings": 1.0 + (i % 3) / 2, "diffusion": 1.0, "router": 2.0},
        "versions": ["0.1.0 abc1234"], "digests": {"embeddings": ["3f2a"]},
    }
    return {**row, **fields}


def report_data(currency="USD") -> dict:
    economics = currency is not None
    money = {"revenue": 54.3, "cost": 17.6, "profit": 36.7, "unit_cost": 0.00102, "cost_per_1k_tasks": 1.02}
    subnet6_days = [day(6, i, economics=economics, **({"profit": 0.6 - 0.3 * (i - 11)} if economics else {}))
                    for i in range(11, 16)]  # a subnet starting to lose money
    subnet6_days[1] = day(6, 12, economics=economics, p95_s=None, availability=None, error_budget_used=None,
                          profit=None, slo_met=None)  # a day with nothing admitted
    return {
        "generated_at": START + 16 * DAY_S + 3600, "currency": currency, "window": "24h",
        "miner": {"name": "torchrank-miner", "version": "0.1.0", "git_sha": "abc1234def", "hotkey": "5FHneW46"},
        "subnets": {
            "6": {"days": subnet6_days,
                  "verdict": {"verdict": "hold", "rule": "hold: fewer than 14 days recorded",
                              "reasons": ["5 days recorded, 14 needed"], "days": 5, "stable_days": 0,
                              "profit_stable": None},
                  "economics": {"tasks": 2000, "accepted": 1950, "acceptance_rate": 0.975,
                                **({k: v / 3 for k, v in money.items()} if economics else dict.fromkeys(money))}},
            "1": {"days": [day(1, i, economics=economics) for i in range(16)],
                  "verdict": {"verdict": "stable", "rule": "stable: 14 days of SLOs met",
                              "reasons": ["SLOs met on the last 14 days"], "days": 16, "stable_days": 14,
                              "profit_stable": 40.5},
                  "economics": {"tasks": 17000, "accepted": 16600, "acceptance_rate": 16600 / 17000,
                                **(money if economics else dict.fromkeys(money))}},
        },
    }


def page_data(availability="days") -> dict:
    days = [{"label": f"2025-12-{i + 1:02d}", "availability": 0.97 + 0.002 * i, "uptime": 1.0} for i in range(14)]
    days[3] = {"label": "2025-12-04", "availability": None, "uptime": None}
    return {
        "name": "torchrank-miner", "version": "0.1.0", "git_sha": "abc1234def", "started_at": START,
        "uptime_s": 3 * DAY_S + 7200, "hotkey": "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty",
        "changes": [{"version": "0.1.0", "changes": ["The report and the public page", "Epistula v2 on subnet 6"]}],
        "models": {"embeddings": {"model": "sentence-transformers/all-MiniLM-L6-v2", "weights_sha256": "3f2a" * 16},
                   "diffusion": {"model": "tiny-sd", "weights_sha256": None}},
        "subnets": [{"netuid": 1, "routes": ["/embeddings"]}, {"netuid": 6, "routes": ["/epistula/embeddings"]}],
        "availability": None if availability is None else {"1": days, "6": []},
    }


@functools.cache
def the_report() -> str:
    """The report of report_data(), drawn once for the tests that only read it."""
    return render_report(report_data())


def figure(html: str, name: str) -> str:
    match = re.search(rf'<figure class="chart" id="chart-{name}">.*?</figure>', html, re.S)
    assert match, f"chart {name} missing"
    return match.group(0)


# --- the report ------------------------------------------------------------------------


def test_report_draws_every_chart_and_says_the_verdicts():
    html = the_report()
    for name in REPORT_CHARTS:
        chart = figure(html, name)
        assert "<figcaption>" in chart and "<svg" in chart and "<path" in chart, name
    stable = re.search(r'<section class="verdict" id="verdict-1" data-verdict="stable">.*?</section>', html, re.S)
    assert stable and "stable: 14 days of SLOs met" in stable.group(0)
    assert '<section class="verdict" id="verdict-6" data-verdict="hold">' in html
    assert html.index('id="subnet-1"') < html.index('id="subnet-6"')  # numeric order, not the dict's
    assert "availability 0.9909 &lt; 0.995" in html  # a missed day says why
    assert "36.70" in html and "0.00102" in html and "1.02" in html  # the window's economics
    assert "not_registered 480, rate_limited 960" in html  # refusals by kind over the days, in the chart's caption


def test_report_leaves_matplotlib_as_it_was():
    import matplotlib

    before = dict(matplotlib.rcParams)  # the backend included
    render_report(report_data())
    assert dict(matplotlib.rcParams) == before


def test_report_is_self_contained():
    html = the_report()
    assert not re.search(r"https?://", html)  # no resource (nor namespace URI) to fetch
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", html, re.I) and "@import" not in html
    assert "url(" not in html.replace("url(#", "")  # only the SVGs' own clip paths
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))  # eight inline SVGs, no id shared between them


def test_report_escapes_every_string():
    data = report_data()
    data["miner"].update(name=HOSTILE, version=HOSTILE, git_sha=HOSTILE, hotkey=HOSTILE)
    subnet = data["subnets"]["1"]
    subnet["verdict"].update(verdict=HOSTILE, rule=HOSTILE, reasons=[HOSTILE])
    subnet["days"][0].update(label=HOSTILE, versions=[HOSTILE], misses=[HOSTILE], slo_met=False,
                             refused={HOSTILE: 5}, replicas={HOSTILE: 1.0, "$x$ a": 2.0})  # "$": no mathtext
    html = render_report(data)
    assert "<script>" not in html and html.count(ESCAPED) >= 8
    assert f'data-verdict="{ESCAPED}"' in html and f"<title>{ESCAPED} report" in html


def test_report_without_economics_or_days_says_so():
    html = render_report(report_data(currency=None))
    assert "<svg" not in figure(html, "profit") and "No economics configured" in figure(html, "profit")
    assert "<svg" in figure(html, "requests-1")  # the rest is still drawn
    assert "\u2014" in html and "None" not in html

    empty = report_data()
    empty["subnets"]["1"]["days"] = []
    empty["subnets"]["6"]["days"] = []
    html = render_report(empty)
    for name in REPORT_CHARTS:
        assert "no days recorded yet" in figure(html, name) and "<svg" not in figure(html, name), name
    assert 'data-verdict="stable"' in html

    assert "No subnets in the ledger yet" in render_report({"generated_at": None, "currency": None, "window": "24h",
                                                            "miner": {}, "subnets": {}})


def test_report_handles_days_without_figures():
    data = report_data()
    for row in data["subnets"]["1"]["days"]:
        row.update(p95_s=None, error_budget_used=None, profit=None, replicas={})
    html = render_report(data)
    assert "no p95 to draw" in figure(html, "latency-1")
    assert "no error budget spent" in figure(html, "error-budget-1")
    assert "no replicas recorded" in figure(html, "replicas")
    assert "<svg" in figure(html, "profit")  # subnet 6's line still drawn


# --- the public page ---------------------------------------------------------------------


def test_page_shows_the_miner_and_14_days():
    html = render_page(page_data())
    assert html.count('<tr class="day') == 14
    assert '<table id="availability-1">' in html and '<table id="availability-6">' in html
    assert "no days recorded yet" in html  # subnet 6 has none
    assert "width: 99.60%" in html and "97.00%" in html and "\u2014" in html
    assert '<a href="/info">the JSON form</a>' in html
    assert "3 d 2 h" in html and "3f2a" * 16 in html and "/epistula/embeddings" in html
    assert not re.search(r"https?://", html) and "<script" not in html


def test_page_escapes_every_string():
    data = page_data()
    data.update(name=HOSTILE, version=HOSTILE, git_sha=HOSTILE, hotkey=HOSTILE,
                changes=[{"version": HOSTILE, "changes": [HOSTILE]}], models={HOSTILE: {"model": HOSTILE}},
                subnets=[{"netuid": HOSTILE, "routes": [HOSTILE]}])
    data["availability"] = {HOSTILE: [{"label": HOSTILE, "availability": 0.5, "uptime": 0.5}]}
    html = render_page(data)
    assert "<script>" not in html and html.count(ESCAPED) >= 10
    assert f'<table id="availability-{ESCAPED}">' in html


def test_page_without_a_ledger():
    html = render_page(page_data(availability=None))
    assert "The ledger is not available right now" in html and "availability-" not in html


# --- in Chromium ---------------------------------------------------------------------------


def test_chromium_draws_the_report(tmp_path):
    path = tmp_path / "report.html"
    path.write_text(the_report())
    with load(path, screenshot=RESULTS / "report.png", height=2480) as page:
        assert page.console_errors == []
        assert page.requests == [path.as_uri()]  # nothing fetched beyond the file itself
        assert page.load_s < 10
        for name in REPORT_CHARTS:
            drawn = page.evaluate(f"""(() => {{
                const svg = document.querySelector("#chart-{name} svg");
                const box = svg ? svg.getBoundingClientRect() : null;
                return box ? [box.width, box.height, svg.querySelectorAll("path, use").length] : null;
            }})()""")
            assert drawn and drawn[0] > 600 and drawn[1] > 150 and drawn[2] > 20, (name, drawn)
        assert page.count("figure.chart figcaption") == len(REPORT_CHARTS)
        assert page.count("section.verdict[data-verdict]") == 2
        assert page.evaluate("document.querySelector('#verdict-1 .verdict-word').innerText") == "STABLE"
        assert page.count("#days-1 tbody tr") == 16
    assert (RESULTS / "report.png").stat().st_size > 10_000


def test_chromium_renders_the_page(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(render_page(page_data()))
    with load(path, screenshot=RESULTS / "page.png", height=1400) as page:
        assert page.console_errors == []
        assert page.requests == [path.as_uri()]
        assert page.count("#availability-1 tr.day") == 14 and page.count("#availability-6 tr.day") == 0
        widths = page.evaluate("[...document.querySelectorAll('#availability-1 td.bar span:not(.note)')]"
                               ".map(s => s.getBoundingClientRect().width)")
        assert len(widths) == 13 and all(250 < w < 330 for w in widths)  # the bars are drawn, to scale
        assert page.evaluate("document.querySelector('#availability-1 tr.day.unknown td.bar').innerText") == "no data"
        assert page.evaluate("document.querySelector('a[href=\"/info\"]').innerText") == "the JSON form"
    assert (RESULTS / "page.png").stat().st_size > 10_000


def test_browser_reports_what_went_wrong(tmp_path):
    """The harness sees errors: a page that fails is not passed as clean."""
    path = tmp_path / "broken.html"
    path.write_text('<img src="missing.png"><script>console.error("boom"); nothing()</script>')
    with load(path) as page:
        errors = "\n".join(page.console_errors)
    assert "boom" in errors and "nothing is not defined" in errors and "missing.png" in errors


def test_chromium_missing_fails_with_the_fix(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="chromium is missing: `make test` installs Debian's chromium"):
        load("about:blank")
