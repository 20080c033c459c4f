"""The miner's public page on `GET /`: what a validator (or anyone) may know about this
miner, the guide's "basic transparency": uptime, version and git sha, the latest changes,
the models and their weights' digests, the subnets served and the last 14 days'
availability from the ledger. `/info` is the same in JSON.

Nothing secret and nothing per caller: the only hotkey is the miner's own. Plain HTML and
CSS (no script, no chart library), so it renders in microseconds on the Router.
"""

from __future__ import annotations

from datetime import datetime, timezone

from serve_app.economics.report import DASH, esc, finite  # report.py imports matplotlib only to draw

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #212121; background: #fafafa; margin: 0; }
main { max-width: 880px; margin: 0 auto; padding: 1.2rem 1.5rem 2.5rem; }
h1 { font-size: 1.5rem; margin: .2rem 0 .4rem; }
h2 { font-size: 1.15rem; margin: 1.6rem 0 .5rem; border-bottom: 1px solid #e0e0e0; padding-bottom: .2rem; }
h3 { font-size: 1rem; margin: 1rem 0 .3rem; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .1rem 1rem; margin: .4rem 0; }
dt { color: #616161; }
dd { margin: 0; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .88rem; overflow-wrap: anywhere; }
table { border-collapse: collapse; background: #fff; margin: .3rem 0 .8rem; font-size: .9rem; }
th, td { border: 1px solid #e0e0e0; padding: .2rem .6rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; font-weight: 600; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
td.bar { width: 320px; }
td.bar span { display: block; height: .8rem; background: #43a047; border-radius: 2px; }
td.bar span.note { background: none; height: auto; font-size: .8rem; }
.note { color: #616161; font-style: italic; }
footer { margin-top: 2rem; color: #616161; font-size: .9rem; }
"""


def _share(value) -> float | None:
    """A share in [0, 1], or None when not known."""
    number = finite(value)
    return None if number is None else min(1.0, max(0.0, number))


def _pct(value) -> str:
    share = _share(value)
    return DASH if share is None else f"{share * 100:.2f}%"


def _duration(seconds) -> str:
    try:
        seconds = max(0, int(float(seconds)))
    except (TypeError, ValueError):
        return DASH
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def _utc(ts) -> str:
    try:
        return datetime.fromtimestamp(float(ts), timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return DASH


def _availability(netuid, days: list[dict]) -> str:
    rows = []
    for day in days[-14:]:
        share = _share(day.get("availability"))
        bar = ('<span class="note">no data</span>' if share is None
               else f'<span style="width: {share * 100:.2f}%"></span>')
        rows.append(f'<tr class="day{"" if share is not None else " unknown"}"><td>{esc(day.get("label", DASH))}</td>'
                    f'<td class="bar">{bar}</td>'
                    f'<td class="number">{_pct(day.get("availability"))}</td>'
                    f'<td class="number">{_pct(day.get("uptime"))}</td></tr>')
    if not rows:
        rows.append('<tr class="empty"><td colspan="4" class="note">no days recorded yet</td></tr>')
    return (f"<h3>Subnet {esc(netuid)}</h3>\n"
            f'<table id="availability-{esc(netuid)}"><thead><tr><th>day</th><th colspan="2">availability</th>'
            f"<th>uptime</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def render_page(data: dict) -> str:
    """The public page as one HTML document (str). `data`: name, version, git_sha, started_at,
    uptime_s, hotkey (the miner's own), changes [{version, changes}], models {workload: {model,
    weights_sha256}}, subnets [{netuid, routes}], availability {netuid: [{label, availability,
    uptime}], oldest first} or None when the ledger is unavailable."""
    name = data.get("name") or "torchrank-miner"
    facts = [("version", esc(data.get("version") or DASH)),
             ("git sha", f"<code>{esc(data.get('git_sha') or DASH)}</code>"),
             ("up for", f"{esc(_duration(data.get('uptime_s')))} (since {esc(_utc(data.get('started_at')))})"),
             ("hotkey", f"<code>{esc(data.get('hotkey') or DASH)}</code>")]
    subnets = data.get("subnets") or []
    served = "".join(f"<tr><td>{esc(s.get('netuid', DASH))}</td>"
                     f"<td>{'<br>'.join(f'<code>{esc(r)}</code>' for r in s.get('routes') or []) or DASH}</td></tr>"
                     for s in subnets)
    models = "".join(f"<tr><td>{esc(workload)}</td><td>{esc((m or {}).get('model') or DASH)}</td>"
                     f"<td><code>{esc((m or {}).get('weights_sha256') or 'unknown')}</code></td></tr>"
                     for workload, m in sorted((data.get("models") or {}).items()))
    changes = "".join(f"<h3>{esc(entry.get('version', DASH))}</h3><ul>"
                      + "".join(f"<li>{esc(c)}</li>" for c in entry.get("changes") or []) + "</ul>"
                      for entry in data.get("changes") or [])
    availability = data.get("availability")
    if availability is None:
        days = '<p class="note">The ledger is not available right now.</p>'
    else:
        netuids = [s.get("netuid") for s in subnets]
        netuids += [n for n in availability if n not in {str(x) for x in netuids}]
        days = "\n".join(_availability(n, availability.get(str(n)) or availability.get(n) or []) for n in netuids)
    sections = [
        "<h2>Availability, the last 14 days</h2>\n" + days,
        "<h2>Subnets served</h2>\n" + (f"<table><thead><tr><th>netuid</th><th>routes</th></tr></thead>"
                                       f"<tbody>{served}</tbody></table>" if served else '<p class="note">none</p>'),
        "<h2>Models</h2>\n" + (f"<table><thead><tr><th>workload</th><th>model</th><th>weights sha256</th></tr>"
                               f"</thead><tbody>{models}</tbody></table>" if models else '<p class="note">none</p>'),
        "<h2>Recent changes</h2>\n" + (changes or '<p class="note">no changelog</p>'),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            '<link rel="icon" href="data:,">\n'  # no /favicon.ico request: the miner answers it 404
            f"<title>{esc(name)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<h1>{esc(name)}</h1>\n<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>\n"
            + "\n".join(sections)
            + '\n<footer>This page for programs: <a href="/info">the JSON form</a> (<code>/info</code>).</footer>\n'
            "</main>\n</body>\n</html>\n")
