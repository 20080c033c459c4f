"""How validators score what they got, and the verdict on the miner.

A task scores 0 when its last attempt was refused, failed, went unanswered or was wrong;
answered right, it scores 1 within the validator's SLO, falling linearly to 0 at its deadline.
A validator's score is the mean over its tasks; the miner's, the stake-weighted mean over
validators (what the chain's consensus of weights follows). What each task lost is charged to
one cause ("503 shed", "latency on images", "wrong embeddings"...): the verdict names the cause
that cost the most stake-weighted score first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence

TARGET = 0.99  # the stake-weighted score a miner must keep to hold its place
EPISODE_GAP_S = 10.0  # refusals of one kind further apart than this are separate episodes
# Error codes (serve_app/errors.py), and the client's own timeout, by what they say of the miner.
CAPACITY = frozenset({"shed", "deadline_exceeded", "TimeoutError"})
AVAILABILITY = frozenset({"breaker_open", "unavailable", "internal_error"})
# What the operator can do about a cause, by its error code (or category).
HINTS = {
    "wrong_receiver": "it signs without naming this miner; auth.require_receiver: false admits such validators",
    "stale_request": "its signatures arrive older than auth.max_age_s (clock skew or slow signing)",
    "malformed_auth": "it signs with another scheme than the subnet's auth.scheme",
    "insufficient_stake": "its stake is under auth.min_stake",
    "no_validator_permit": "the metagraph gives it no validator permit",
    "not_registered": "the miner's metagraph does not list it",
    "denied": "auth.deny_hotkeys lists it",
    "rate_limited": "its rate is over its share of rate_limit.total_rps (or floor_rps)",
    "capacity": "more than this hardware answers in time: add replicas or a faster backend (README \"Scaling\"), "
                "or lower the load",
    "availability": "a workload failed or was restarting",
    "latency": "answers come slower than the validator's SLO",
    "correctness": "answers fail the validator's check",
}


@dataclass
class Attempt:
    validator: int  # index into the population
    kind: str
    task: int
    attempt: int  # 0 for the first try; retries count up
    sent_at: float  # Unix time
    seconds: float
    status: int  # 0: no HTTP answer (the validator's timeout or a broken connection)
    error: str = ""  # the JSON error code; the exception's name without an answer; "" for 200
    correct: Optional[bool] = None  # the answer passed its check (None: not answered)
    note: str = ""  # why it did not
    unanswered: bool = False  # agents: the run ended without an answer


def latency_credit(seconds: float, slo_s: float, deadline_s: float) -> float:
    if seconds <= slo_s:
        return 1.0
    if seconds >= deadline_s or deadline_s <= slo_s:
        return 0.0
    return (deadline_s - seconds) / (deadline_s - slo_s)


def category(a: Attempt) -> str:
    """What a lost task says about the miner: capacity, availability, auth, rate limit, limits."""
    if a.status == 200:
        return "correctness" if not a.correct else "latency"
    if a.error in CAPACITY:
        return "capacity"
    if a.status == 0 or a.error in AVAILABILITY or a.status >= 500:
        return "availability"
    if a.status in (401, 403):
        return "auth"
    if a.status == 429:
        return "rate limit"
    return "request limits"


def hint(a: Attempt) -> str:
    return HINTS.get(a.error) or HINTS.get(category(a), "")


def outcome(a: Attempt) -> str:
    if a.status == 200:
        return "answered"
    return f"{a.status} {a.error}".strip() if a.status else f"no answer ({a.error})"


def task_loss(a: Attempt, slo_s: float, deadline_s: float) -> tuple[float, str]:
    """(score lost, the cause charged) for a task (`tasks`: its last attempt, timed from its first send)."""
    if a.status != 200:
        return 1.0, outcome(a)
    if not a.correct:
        return 1.0, f"wrong {a.kind}"
    return 1.0 - latency_credit(a.seconds, slo_s, deadline_s), f"latency on {a.kind}"


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)  # nearest rank: the smallest value with at least q of them at or under it
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 1)


def clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def episodes(hits: list[Attempt]) -> list[list[Attempt]]:
    """`hits` (by send time) in runs without a gap over EPISODE_GAP_S."""
    out: list[list[Attempt]] = []
    for a in sorted(hits, key=lambda a: a.sent_at):
        if out and a.sent_at - (out[-1][-1].sent_at + out[-1][-1].seconds) <= EPISODE_GAP_S:
            out[-1].append(a)
        else:
            out.append([a])
    return out


def _during(hits: list[Attempt], faults: Sequence[dict]) -> str:
    """The faults that most of these hits fell inside. An episode already under way before a
    fault began is not its doing, however long the fault's window (a slow recovery can stretch
    it over most of a short run)."""
    first_back = min(a.sent_at + a.seconds for a in hits)
    names = [f["name"] for f in faults if first_back >= f["start"]
             and 2 * sum(1 for a in hits if f["start"] <= a.sent_at + a.seconds and a.sent_at <= f["end"]) > len(hits)]
    return f" (during {', '.join(names)})" if names else ""


def _share(n: int, of: int) -> str:
    share = 100 * n / of
    return f"{share:.0f} %" if share >= 1 or n == 0 else "<1 %"


def tasks_of(attempts: Iterable[Attempt]) -> dict[tuple[int, int], Attempt]:
    """(validator, task) -> the task as the validator lived it: its last attempt's outcome, sent
    when its first was, taking until its last answer (refused tries and retry waits included)."""
    first: dict[tuple[int, int], Attempt] = {}
    last: dict[tuple[int, int], Attempt] = {}
    for a in attempts:
        key = (a.validator, a.task)
        if key not in first or a.attempt < first[key].attempt:
            first[key] = a
        if key not in last or a.attempt > last[key].attempt:
            last[key] = a
    return {key: a if a is first[key] else replace(a, sent_at=first[key].sent_at,
                                                   seconds=a.sent_at + a.seconds - first[key].sent_at)
            for key, a in last.items()}


def validator_result(v, attempts: list[Attempt], tasks: list[Attempt], faults: Sequence[dict]) -> dict:
    """One validator's score, counts, latency and breakdown, from its attempts and tasks' last attempts."""
    losses: dict[str, float] = {}
    categories: dict[str, tuple[str, str]] = {}
    total = 0.0
    for a in tasks:
        lost, cause = task_loss(a, v.slo_s, v.timeout_s)
        total += 1.0 - lost
        if lost > 0:
            losses[cause] = losses.get(cause, 0.0) + lost
            categories[cause] = category(a), hint(a)
    n = len(tasks)
    answered = [a for a in tasks if a.status == 200]
    refused = [a for a in tasks if a.status and a.status != 200]
    failed = [a for a in tasks if not a.status]
    breakdown = []
    for what in sorted({outcome(a) for a in tasks if a.status != 200}):
        hit = [a for a in tasks if a.status != 200 and outcome(a) == what]
        runs = episodes(hit)
        spans = ", ".join(f"{clock(r[0].sent_at)}-{clock(max(a.sent_at + a.seconds for a in r))}{_during(r, faults)}"
                          for r in runs[:3]) + (f" and {len(runs) - 3} more episodes" if len(runs) > 3 else "")
        verb = "refused" if hit[0].status else "got"
        breakdown.append(f"{_share(len(hit), n)} {verb} {what} at {spans}")
    retried = [a for a in tasks if a.attempt > 0]
    if retried:
        breakdown.append(f"{len(retried)} tasks retried after a refusal: "
                         f"{sum(1 for a in retried if a.status == 200)} answered on a retry")
    kinds = sorted({a.kind for a in tasks})
    routes = {}
    for kind in kinds:
        mine = [a for a in tasks if a.kind == kind]
        ok = [a.seconds for a in mine if a.status == 200]
        wrong = [a for a in mine if a.status == 200 and not a.correct]
        p95 = percentile(ok, 0.95)
        routes[kind] = {"tasks": len(mine), "answered": len(ok), "wrong": len(wrong),
                        "p50_ms": _ms(percentile(ok, 0.5)), "p95_ms": _ms(p95)}
        if wrong:
            breakdown.append(f"{_share(len(wrong), len(mine))} wrong on {kind}: {wrong[0].note}")
        if p95 is not None and p95 > v.slo_s:
            breakdown.append(f"p95 {p95:.2f} s against a {v.slo_s:g} s SLO on {kind}")
        unanswered = sum(1 for a in mine if a.status == 200 and a.unanswered)
        if unanswered:
            breakdown.append(f"{_share(unanswered, len(mine))} of {kind} runs ended without an answer "
                             f"(finish max_steps; the trace is still well-formed)")
    ok_all = [a.seconds for a in answered]
    return {
        "name": v.name, "hotkey": v.hotkey, "stake": v.stake, "registered": v.registered,
        "score": round(total / n, 4) if n else None, "tasks": n, "attempts": len(attempts),
        "answered": len(answered), "refused": len(refused), "failed": len(failed),
        "wrong": sum(1 for a in answered if not a.correct), "retried": len(retried),
        "p50_ms": _ms(percentile(ok_all, 0.5)), "p95_ms": _ms(percentile(ok_all, 0.95)),
        "timeout_s": v.timeout_s, "slo_s": v.slo_s, "receiver": v.receiver, "retries": v.retries,
        "routes": routes, "breakdown": breakdown,
        "losses": {cause: {"lost": round(lost / n, 4), "category": categories[cause][0], "hint": categories[cause][1]}
                   for cause, lost in sorted(losses.items(), key=lambda kv: -kv[1])},
    }


def route_results(tasks: list[Attempt], validators) -> dict[str, dict]:
    out = {}
    for kind in sorted({a.kind for a in tasks}):
        mine = [a for a in tasks if a.kind == kind]
        ok = [a.seconds for a in mine if a.status == 200]
        scores = [1.0 - task_loss(a, validators[a.validator].slo_s, validators[a.validator].timeout_s)[0]
                  for a in mine]
        out[kind] = {"tasks": len(mine), "answered": len(ok),
                     "refused": sum(1 for a in mine if a.status and a.status != 200),
                     "failed": sum(1 for a in mine if not a.status),
                     "wrong": sum(1 for a in mine if a.status == 200 and not a.correct),
                     "p50_ms": _ms(percentile(ok, 0.5)), "p95_ms": _ms(percentile(ok, 0.95)),
                     "p99_ms": _ms(percentile(ok, 0.99)), "score": round(sum(scores) / len(scores), 4)}
    return out


def verdict(results: list[dict], target: float, run: dict) -> dict:
    scored = [r for r in results if r["tasks"]]
    stakes = [r["stake"] for r in scored]
    weights = stakes if sum(stakes) > 0 else [1.0] * len(scored)
    total = sum(weights) or 1.0
    score = sum(w * r["score"] for w, r in zip(weights, scored)) / total if scored else 0.0
    causes: dict[str, dict] = {}
    for w, r in zip(weights, scored):
        if w <= 0:
            continue  # no stake, no weight in consensus
        for cause, loss in r["losses"].items():
            c = causes.setdefault(cause, {"lost": 0.0, "category": loss["category"], "hint": loss["hint"],
                                          "validators": []})
            c["lost"] += w * loss["lost"] / total
            c["validators"].append(r["name"])
    lost = sum(c["lost"] for c in causes.values())
    ranked = sorted(causes.items(), key=lambda kv: -kv[1]["lost"])
    limits = [{"cause": cause, "category": c["category"], "hint": c["hint"], "lost": round(c["lost"], 4),
               "share_of_lost": round(c["lost"] / lost, 3) if lost else 0.0, "validators": c["validators"]}
              for cause, c in ranked]
    top = max(scored, key=lambda r: r["stake"]) if scored else None
    holds = bool(scored) and score >= target
    load = f"{run['rate']:g} req/s {run['profile']}"
    if not scored:
        text = "no task was sent: nothing to judge"
    elif holds:
        text = f"holds its score at {load}: stake-weighted {score:.3f} (target {target:g})"
        if limits:
            text += f"; the first to give: {_limit_text(limits[0])}"
    else:
        text = (f"would lose score at {load}: stake-weighted {score:.3f} under {target:g}"
                + (f"; first limit: {_limit_text(limits[0])}" if limits else ""))
    return {"holds": holds, "score": round(score, 4), "target": target,
            "top_stake": None if top is None else {"name": top["name"], "score": top["score"]},
            "limits": limits, "text": text}


def _limit_text(limit: dict) -> str:
    return (f"{limit['category']}: {limit['cause']} ({100 * limit['share_of_lost']:.0f} % of the lost score, "
            f"{', '.join(limit['validators'])})" + (f": {limit['hint']}" if limit["hint"] else ""))


def score_run(attempts: list[Attempt], validators, run: dict, faults: Sequence[dict] = (),
              target: float = TARGET) -> dict:
    """The whole report: {"run", "validators": [...], "routes": {...}, "faults", "verdict", "ledger_line"}."""
    tasks = tasks_of(attempts)
    results = []
    for i, v in enumerate(validators):
        mine = [a for a in attempts if a.validator == i]
        results.append(validator_result(v, mine, [a for (vi, _), a in sorted(tasks.items()) if vi == i], faults))
    judged = verdict(results, target, run)
    line = {"at": run.get("started_at"), "netuid": run.get("netuid"), "seconds": run.get("seconds"),
            "rate": run.get("rate"), "profile": run.get("profile"), "validators": len(validators),
            "tasks": len(tasks), "answered": sum(r["answered"] for r in results),
            "score": judged["score"], "top_stake_score": (judged["top_stake"] or {}).get("score"),
            "holds": judged["holds"], "first_limit": judged["limits"][0]["cause"] if judged["limits"] else None}
    return {"run": run, "validators": results, "routes": route_results(list(tasks.values()), validators),
            "faults": list(faults), "verdict": judged, "ledger_line": line}


def outside(attempts: Iterable[Attempt], windows: Sequence[dict]) -> list[Attempt]:
    """The attempts of tasks whose every attempt was sent and answered outside `windows`."""
    attempts = list(attempts)
    touched = {(a.validator, a.task) for a in attempts
               if any(w["start"] <= a.sent_at + a.seconds and a.sent_at <= w["end"] for w in windows)}
    return [a for a in attempts if (a.validator, a.task) not in touched]


def text(report: dict) -> str:
    """The tables: one line per validator with its breakdown, one per route, the verdict."""
    run = report["run"]
    lines = [f"subnet {run['netuid']}: {run['seconds']:g} s at {run['rate']:g} req/s ({run['profile']}), "
             f"{report['ledger_line']['tasks']} tasks from {len(report['validators'])} validators at {run['url']}"]
    lines.append(f"{'validator':<12} {'hotkey':<10} {'stake':>9} {'score':>6} {'tasks':>6} {'answered':>8} "
                 f"{'refused':>7} {'failed':>6} {'wrong':>5} {'p95 ms':>8}")
    for r in report["validators"]:
        lines.append(f"{r['name'][:12]:<12} {r['hotkey'][:8] + '..':<10} {r['stake']:>9g} "
                     f"{_num(r['score'], 3):>6} {r['tasks']:>6} {r['answered']:>8} {r['refused']:>7} "
                     f"{r['failed']:>6} {r['wrong']:>5} {_num(r['p95_ms'], 1):>8}")
        for item in r["breakdown"]:
            lines.append(f"    {item}")
    lines.append("")
    lines.append(f"{'route':<12} {'tasks':>6} {'answered':>8} {'refused':>7} {'failed':>6} {'wrong':>5} "
                 f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'score':>6}")
    for kind, r in report["routes"].items():
        lines.append(f"{kind:<12} {r['tasks']:>6} {r['answered']:>8} {r['refused']:>7} {r['failed']:>6} "
                     f"{r['wrong']:>5} {_num(r['p50_ms'], 1):>8} {_num(r['p95_ms'], 1):>8} "
                     f"{_num(r['p99_ms'], 1):>8} {_num(r['score'], 3):>6}")
    for fault in report["faults"]:
        lines.append(f"fault {fault['name']}: {clock(fault['start'])}-{clock(fault['end'])}")
    lines.append("")
    lines.append(f"verdict: {report['verdict']['text']}")
    return "\n".join(lines)


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"

