"""The operator's report: one self-contained HTML file, opened on Monday to see whether each
subnet is earning and whether it is time to grow.

Everything is inline (CSS in a <style> tag, charts drawn by matplotlib as SVG), so the file
opens without a network and can be mailed or archived as it is. `render_report` takes the
ledger's figures as plain data (day rows, verdicts, the window's economics; the CLI collects
them) and reads no clock, file or config itself.

matplotlib is imported when a report is drawn, through `Figure` alone: no pyplot, no backend
switch, rcParams only inside an `rc_context`, so a process that draws a report keeps its
global matplotlib state.
"""

from __future__ import annotations

import html
import io
import math
import re
from datetime import datetime, timezone

DASH = "\u2014"  # a figure that is not known (no economics, no requests, no day)
COLOURS = {"accepted": "#2e7d32", "late": "#f9a825", "failed": "#c62828", "refused": "#9e9e9e"}
LINE_COLOURS = ["#1565c0", "#ef6c00", "#6a1b9a", "#00838f", "#ad1457", "#558b2f", "#4e342e", "#37474f"]
RC = {"font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
      "grid.color": "#e0e0e0", "grid.linewidth": 0.6, "axes.axisbelow": True, "legend.frameon": False,
      "svg.fonttype": "path"}  # glyphs as paths: the SVG needs no font on the reader's machine
FIGSIZE = (9.0, 3.0)

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #212121; background: #fafafa; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 1.2rem 1.5rem 3rem; }
header { border-bottom: 2px solid #e0e0e0; margin-bottom: 1.2rem; }
h1 { font-size: 1.6rem; margin: .2rem 0 .4rem; }
h2 { font-size: 1.3rem; margin: 2rem 0 .6rem; border-bottom: 1px solid #e0e0e0; padding-bottom: .2rem; }
h3 { font-size: 1.05rem; margin: 1.2rem 0 .4rem; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .1rem 1rem; margin: .4rem 0 1rem; }
dl.facts dt { color: #616161; }
dl.facts dd { margin: 0; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .9rem;
              overflow-wrap: anywhere; }
table { border-collapse: collapse; background: #fff; margin: .4rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #e0e0e0; padding: .25rem .6rem; text-align: right; vertical-align: top; }
th { background: #f5f5f5; font-weight: 600; }
th:first-child, td:first-child, th.text, td.text { text-align: left; }
td.na { color: #9e9e9e; }
td.bad, .bad { color: #c62828; }
td.good { color: #2e7d32; }
table.days td.text { font-size: .85rem; }
.note { color: #616161; font-style: italic; background: #fff; border: 1px dashed #bdbdbd;
        padding: .6rem .8rem; margin: .4rem 0 1rem; }
section.verdict { border-left: 6px solid #9e9e9e; background: #fff; padding: .6rem 1rem; margin: .6rem 0 1rem; }
section.verdict[data-verdict="hold"] { border-color: #ef6c00; }
section.verdict[data-verdict="stable"] { border-color: #1565c0; }
section.verdict[data-verdict="expand"] { border-color: #2e7d32; }
.verdict-word { font-size: 1.4rem; font-weight: 700; text-transform: uppercase; letter-spacing: .05em; margin: 0; }
section.verdict[data-verdict="hold"] .verdict-word { color: #ef6c00; }
section.verdict[data-verdict="stable"] .verdict-word { color: #1565c0; }
section.verdict[data-verdict="expand"] .verdict-word { color: #2e7d32; }
.rule { margin: .2rem 0; color: #424242; }
.verdict ul { margin: .3rem 0 .2rem; padding-left: 1.3rem; }
.overview { display: grid; grid-template-columns: 1fr max-content; gap: 0 1.5rem; align-items: start; }
.overview h3 { margin-top: .6rem; }
.overview .note { max-width: 22rem; }
table.days { width: 100%; }
table.days td { white-space: nowrap; }
table.days td.text { white-space: normal; }
figure.chart { background: #fff; border: 1px solid #e0e0e0; margin: .6rem 0 1rem; padding: .5rem .8rem; }
figure.chart figcaption { font-weight: 600; margin-bottom: .3rem; }
figure.chart figcaption small { font-weight: normal; color: #616161; }
figure.chart svg { display: block; width: 100%; height: auto; }
figure.chart svg * { stroke-linejoin: round; stroke-linecap: butt; }
figure.chart .note { margin: .2rem 0; }
"""


def esc(value) -> str:
    """Any value as HTML text (the page uses it too)."""
    return html.escape(str(value), quote=True)


def finite(value) -> float | None:
    """A finite float, or None for a missing, None or non-finite figure."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _pct(value, digits: int = 2) -> str:
    number = finite(value)
    return DASH if number is None else f"{number * 100:.{digits}f}%"


def _money(value) -> str:
    number = finite(value)
    if number is None:
        return DASH
    return f"{number:,.2f}" if number == 0 or abs(number) >= 0.01 else f"{number:.3g}"


def _count(value) -> str:
    number = finite(value)
    return DASH if number is None else f"{number:,.0f}"


def _seconds(value) -> str:
    number = finite(value)
    if number is None:
        return DASH
    if number >= 1:
        return f"{number:.2f} s"
    ms = number * 1000
    return f"{ms:.0f} ms" if ms >= 10 or ms == 0 else f"{ms:.2g} ms"


def _cell(text: str, css: str = "") -> str:
    css = " ".join(c for c in (*css.split(), "na" if text == DASH else "") if c)
    return f'<td class="{css}">{esc(text)}</td>' if css else f"<td>{esc(text)}</td>"


def _plain(text) -> str:
    """A label for matplotlib, which would read "$...$" as mathtext."""
    return str(text).replace("$", r"\$")


def _netuid_order(netuid: str):
    return (0, int(netuid), "") if str(netuid).lstrip("-").isdigit() else (1, 0, str(netuid))


# --- charts -------------------------------------------------------------------------------


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, layout="constrained")
    return fig, fig.subplots()


def _svg(fig, name: str) -> str:
    """The figure as an inline <svg>: no XML prolog, metadata or comments, ids prefixed with
    the chart's name (several charts share one HTML document), sized by CSS."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": name}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    root, svg = svg.split(">", 1)  # the root tag: sized by CSS, namespaces implied by HTML
    root = re.sub(r'\s(?:xmlns(?::xlink)?|width|height|version)="[^"]*"', "", root)
    svg = root.replace("<svg", f'<svg role="img" aria-label="{esc(name)}"', 1) + ">" + svg
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    svg = re.sub(r'<style type="text/css">.*?</style>', "", svg, flags=re.S)  # its global "*" rule is in CSS
    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{name}-{m.group(1)}"', svg)
    svg = re.sub(r'(href="#|url\(#)([^")]+)', lambda m: f"{m.group(1)}{name}-{m.group(2)}", svg)
    return svg


def _day_axis(ax, labels: list[str]) -> None:
    """Day labels under the x axis, thinned to about 14 and slanted when there are many."""
    step = max(1, math.ceil(len(labels) / 14))
    ticks = list(range(0, len(labels), step))
    ax.set_xticks(ticks, [_plain(labels[i]) for i in ticks], rotation=30 if len(labels) > 7 else 0,
                  ha="right" if len(labels) > 7 else "center")
    ax.set_xlim(-0.6, len(labels) - 0.4)


class _Note(str):
    """What a chart says instead of drawing (nothing to draw on these days)."""


def _no_data(ax, xs: list[int]) -> None:
    """Writes "no data" at the days without a figure, so a gap reads as one, not as zero."""
    for x in xs:
        ax.text(x, 0.03, "no data", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=7, color="#757575", rotation=90)


def _chart(name: str, caption: str, draw, rows, note: str | None = None, detail: str = "") -> str:
    """A <figure class="chart">: `draw(name, rows)`'s SVG, or a note saying why there is none."""
    import matplotlib

    if note is None:
        with matplotlib.rc_context(RC):
            drawn = draw(name, rows)
        body = f'<p class="note">{esc(drawn)}</p>' if isinstance(drawn, _Note) else drawn
    else:
        body = f'<p class="note">{esc(note)}</p>'
    detail = f" <small>{esc(detail)}</small>" if detail else ""
    return (f'<figure class="chart" id="chart-{esc(name)}">\n<figcaption>{esc(caption)}{detail}</figcaption>\n'
            f"{body}\n</figure>")


def _requests_svg(name: str, days: list[dict]) -> str:
    fig, ax = _figure()
    xs = list(range(len(days)))
    bottom = [0.0] * len(days)
    total = 0.0
    for part in ("accepted", "late", "failed", "refused"):
        if part == "refused":
            values = [sum(finite(v) or 0.0 for v in (d.get("refused") or {}).values()) for d in days]
        else:
            values = [finite(d.get(part)) or 0.0 for d in days]
        total += sum(values)
        ax.bar(xs, values, bottom=bottom, color=COLOURS[part], label=part, width=0.7)
        bottom = [b + v for b, v in zip(bottom, values)]
    if not total:
        return _Note("no requests recorded on these days")
    ax.set_ylabel("requests per day")
    ax.legend(loc="upper left", ncols=4, fontsize=8)
    ax.set_ylim(0, max(bottom) * 1.18)
    _day_axis(ax, [d.get("label", "") for d in days])
    return _svg(fig, name)


def _latency_svg(name: str, days: list[dict]) -> str:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    p95 = [finite(d.get("p95_s")) for d in days]
    slo = [finite(d.get("slo_latency_s")) for d in days]
    if all(v is None for v in p95):
        return _Note("no request was answered on these days: no p95 to draw")
    fig, ax = _figure()
    xs = list(range(len(days)))
    nan = float("nan")
    ax.plot(xs, [nan if v is None else v for v in p95], color=LINE_COLOURS[0], marker="o", markersize=4,
            label="p95 latency")
    over = [(x, v) for x, v, s in zip(xs, p95, slo) if v is not None and s is not None and v > s]
    if over:
        ax.plot([x for x, _ in over], [v for _, v in over], linestyle="none", marker="o", markersize=6,
                color=COLOURS["failed"], label="over the SLO")
    if any(s is not None for s in slo):
        ax.step(xs, [nan if s is None else s for s in slo], where="mid", color=COLOURS["failed"],
                linestyle="--", linewidth=1.2, label="SLO latency")
    known = [v for v in p95 + slo if v is not None and v > 0]
    if known and max(known) / min(known) > 20:  # a good day and the SLO both readable
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(0, max(known or [1.0]) * 1.2)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: _seconds(value)))
    _no_data(ax, [x for x, v in zip(xs, p95) if v is None])
    ax.set_ylabel("p95 latency")
    ax.legend(loc="best", fontsize=8)
    _day_axis(ax, [d.get("label", "") for d in days])
    return _svg(fig, name)


def _error_budget_svg(name: str, days: list[dict]) -> str:
    used = [finite(d.get("error_budget_used")) for d in days]
    if all(v is None for v in used):
        return _Note("no admitted requests on these days: no error budget spent")
    fig, ax = _figure()
    xs = [x for x, v in enumerate(used) if v is not None]
    values = [used[x] * 100 for x in xs]
    ax.bar(xs, values, width=0.7, color=[COLOURS["failed"] if v > 100 else LINE_COLOURS[0] for v in values])
    ax.axhline(100, color=COLOURS["failed"], linestyle="--", linewidth=1.2, label="the day's budget (100%)")
    ax.set_ylim(0, max(values + [100]) * 1.2)
    _no_data(ax, [x for x, v in enumerate(used) if v is None])
    ax.set_ylabel("% of the day's error budget")
    ax.legend(loc="upper left", fontsize=8)
    _day_axis(ax, [d.get("label", "") for d in days])
    return _svg(fig, name)


def _profit_svg(name: str, subnets: dict) -> str:
    starts = {}
    for subnet in subnets.values():
        for d in subnet.get("days") or []:
            starts.setdefault(d.get("label", ""), finite(d.get("start")) or 0.0)
    labels = sorted(starts, key=lambda label: (starts[label], label))
    if not labels:
        return _Note("no days recorded yet")
    position = {label: i for i, label in enumerate(labels)}
    fig, ax = _figure()
    drawn = False
    for i, netuid in enumerate(sorted(subnets, key=_netuid_order)):
        points = sorted((position[d.get("label", "")], finite(d.get("profit")))
                        for d in subnets[netuid].get("days") or [])
        if all(p is None for _, p in points):
            continue
        ax.plot([x for x, _ in points], [float("nan") if p is None else p for _, p in points],
                color=LINE_COLOURS[i % len(LINE_COLOURS)], marker="o", markersize=4, label=_plain(f"subnet {netuid}"))
        drawn = True
    if not drawn:
        return _Note("no profit recorded on these days")
    ax.axhline(0, color="#616161", linewidth=0.8)
    ax.set_ylabel("profit per day")
    ax.legend(loc="best", fontsize=8)
    _day_axis(ax, labels)
    return _svg(fig, name)


def _replicas_svg(name: str, days: list[dict]) -> str:
    workloads = sorted({w for d in days for w in (d.get("replicas") or {})})
    if not workloads:
        return _Note("no replicas recorded on these days")
    fig, ax = _figure()
    xs = list(range(len(days)))
    top = 0.0
    for i, workload in enumerate(workloads):
        values = [finite((d.get("replicas") or {}).get(workload)) for d in days]
        top = max([top] + [v for v in values if v is not None])
        ax.plot(xs, [float("nan") if v is None else v for v in values], color=LINE_COLOURS[i % len(LINE_COLOURS)],
                marker="o", markersize=4, label=_plain(workload))
    ax.set_ylim(0, max(1.0, top) * 1.25)
    ax.set_ylabel("mean replicas held")
    ax.legend(loc="upper left", ncols=min(4, len(workloads)), fontsize=8)
    _day_axis(ax, [d.get("label", "") for d in days])
    return _svg(fig, name)


# --- sections -----------------------------------------------------------------------------


def _verdict(netuid: str, verdict: dict | None) -> str:
    verdict = verdict or {}
    word = str(verdict.get("verdict") or "unknown")
    reasons = "".join(f"<li>{esc(r)}</li>" for r in verdict.get("reasons") or [])
    facts = [f"{_count(verdict.get('days'))} days recorded", f"{_count(verdict.get('stable_days'))} stable"]
    if finite(verdict.get("profit_stable")) is not None:
        facts.append(f"profit over the stable days {_money(verdict.get('profit_stable'))}")
    return (f'<section class="verdict" id="verdict-{esc(netuid)}" data-verdict="{esc(word)}">\n'
            f'<p class="verdict-word">{esc(word)}</p>\n'
            f'<p class="rule">Rule: {esc(verdict.get("rule") or DASH)}</p>\n'
            + (f"<ul>{reasons}</ul>\n" if reasons else "")
            + f'<p class="rule">{esc(", ".join(facts))}</p>\n</section>')


def _economics(economics: dict | None, currency: str | None, window: str) -> str:
    economics = economics or {}
    unit = f" ({currency})" if currency else ""
    rows = [("tasks (admitted requests)", _count(economics.get("tasks")), ""),
            ("accepted (in deadline and SLO)", _count(economics.get("accepted")), ""),
            ("acceptance rate", _pct(economics.get("acceptance_rate")), ""),
            (f"revenue{unit}", _money(economics.get("revenue")), ""),
            (f"cost{unit}", _money(economics.get("cost")), ""),
            (f"profit{unit}", _money(economics.get("profit")), _sign(economics.get("profit"))),
            (f"unit cost per task{unit}", _money(economics.get("unit_cost")), ""),
            (f"cost per 1,000 tasks{unit}", _money(economics.get("cost_per_1k_tasks")), "")]
    body = "".join(f"<tr><th>{esc(label)}</th>{_cell(value, css)}</tr>" for label, value, css in rows)
    note = ("" if currency else
            '<p class="note">No economics configured (the serve config has no <code>economics:</code> block): '
            "revenue, cost and profit are not known.</p>\n")
    return (f'<div class="economics"><h3>The last {esc(window)}</h3>\n<table class="economics">{body}</table>\n'
            f"{note}</div>")


def _sign(value) -> str:
    number = finite(value)
    return "" if number is None or number == 0 else ("good" if number > 0 else "bad")


def _days_table(netuid: str, days: list[dict]) -> str:
    if not days:
        return ""
    head = ("date", "requests", "availability", "latency attainment", "p95", "uptime", "SLO met",
            "revenue", "cost", "profit", "versions")
    rows = []
    for d in reversed(days):
        met = d.get("slo_met")
        misses = "; ".join(str(m) for m in d.get("misses") or [])
        met_text = DASH if met is None else ("yes" if met else "no" + (f": {misses}" if misses else ""))
        rows.append("<tr>" + "".join([
            _cell(str(d.get("label", DASH)), "text"), _cell(_count(d.get("requests"))),
            _cell(_pct(d.get("availability"))), _cell(_pct(d.get("latency_attainment"))),
            _cell(_seconds(d.get("p95_s"))), _cell(_pct(d.get("uptime"), 1)),
            _cell(met_text, "text " + ("" if met is None else ("good" if met else "bad"))),
            _cell(_money(d.get("revenue"))), _cell(_money(d.get("cost"))),
            _cell(_money(d.get("profit")), _sign(d.get("profit"))),
            _cell(", ".join(str(v) for v in d.get("versions") or []) or DASH, "text")]) + "</tr>")
    header = "".join(f'<th class="text">{esc(h)}</th>' if h in ("date", "SLO met", "versions") else f"<th>{esc(h)}</th>"
                     for h in head)
    return (f'<h3>Day by day <small>(newest first)</small></h3>\n<table class="days" id="days-{esc(netuid)}">'
            f"<thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _subnet(netuid: str, subnet: dict, currency: str | None, window: str) -> str:
    days = subnet.get("days") or []
    empty = "no days recorded yet" if not days else None
    refused = {}
    for d in days:
        for kind, n in (d.get("refused") or {}).items():
            refused[kind] = refused.get(kind, 0) + (finite(n) or 0)
    refused_detail = ("refused: " + ", ".join(f"{k} {_count(v)}" for k, v in sorted(refused.items()))
                      if refused else "")
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", str(netuid))
    charts = [
        _chart(f"requests-{slug}", "Answered and refused per day", _requests_svg, days, note=empty,
               detail=refused_detail),
        _chart(f"latency-{slug}", "p95 latency per day against the SLO", _latency_svg, days, note=empty),
        _chart(f"error-budget-{slug}", "Error budget used per day", _error_budget_svg, days, note=empty,
               detail="over 100%: the day missed its availability or latency objective"),
    ]
    return (f'<section class="subnet" id="subnet-{esc(netuid)}">\n<h2>Subnet {esc(netuid)}</h2>\n'
            + '<div class="overview">' + _verdict(netuid, subnet.get("verdict")) + "\n"
            + _economics(subnet.get("economics"), currency, window) + "</div>\n"
            + "\n".join(charts) + "\n" + _days_table(netuid, days) + "\n</section>")


def _summary(order: list[str], subnets: dict, currency: str | None) -> str:
    unit = f" ({currency})" if currency else ""
    rows = []
    for netuid in order:
        subnet = subnets[netuid]
        economics = subnet.get("economics") or {}
        word = str((subnet.get("verdict") or {}).get("verdict") or "unknown")
        rows.append(f'<tr><td><a href="#subnet-{esc(netuid)}">subnet {esc(netuid)}</a></td>'
                    f"{_cell(word, 'text')}{_cell(_count(len(subnet.get('days') or [])))}"
                    f"{_cell(_count(economics.get('tasks')))}{_cell(_pct(economics.get('acceptance_rate')))}"
                    f"{_cell(_money(economics.get('profit')), _sign(economics.get('profit')))}</tr>")
    return ('<table class="summary"><thead><tr><th>subnet</th><th>verdict</th><th>days</th><th>tasks</th>'
            f"<th>acceptance</th><th>profit{esc(unit)}</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def render_report(data: dict) -> str:
    """The report as one HTML document (str). `data`: generated_at, miner {name, version,
    git_sha, hotkey}, currency (None: no economics configured), window, and per subnet its day
    rows (oldest first), verdict and the window's economics."""
    miner = data.get("miner") or {}
    currency = data.get("currency")
    window = str(data.get("window") or DASH)
    subnets = data.get("subnets") or {}
    order = sorted(subnets, key=_netuid_order)
    generated = finite(data.get("generated_at"))
    generated_text = (datetime.fromtimestamp(generated, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                      if generated is not None else DASH)
    facts = [("version", miner.get("version")), ("git sha", miner.get("git_sha")), ("hotkey", miner.get("hotkey")),
             ("generated", generated_text), ("window", window),
             ("currency", currency or "none (no economics configured)")]
    header = ("<header>\n<h1>" + esc(f"{miner.get('name') or 'miner'}: the operator's report") + "</h1>\n"
              '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v if v not in (None, '') else DASH)}</dd>"
                                             for k, v in facts) + "</dl>\n</header>")
    if not order:
        body = '<p class="note">No subnets in the ledger yet.</p>'
    else:
        first = order[0]
        first_days = subnets[first].get("days") or []
        profit = _chart("profit", "Profit per day, per subnet", _profit_svg, subnets,
                        note=None if currency else "No economics configured (the serve config has no economics: "
                                                   "block): there is no profit to draw.",
                        detail=f"({currency})" if currency else "")
        replicas = _chart("replicas", "Mean replicas held per workload per day",
                          _replicas_svg, first_days,
                          note=None if first_days else "no days recorded yet",
                          detail=f"(the miner's deployments; from subnet {first}'s ledger)")
        body = ("<h2>All subnets</h2>\n" + _summary(order, subnets, currency) + "\n" + profit + "\n" + replicas
                + "\n" + "\n".join(_subnet(n, subnets[n], currency, window) for n in order))
    title = esc(f"{miner.get('name') or 'miner'} report, {generated_text}")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{header}\n{body}\n"
            "</main>\n</body>\n</html>\n")
