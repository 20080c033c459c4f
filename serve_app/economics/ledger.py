"""The consistency ledger: each subnet's days in one SQLite file, and the readiness verdict.

The miner guide's "Phase 1: lock SLOs; gather 7-14 day consistency data" and "when to scale?
after 2-4 weeks of stable score + positive unit economics" need days of figures that survive
restarts. The router replicas hand their counts to one keeper (serve_app/economics/keeper.py),
which adds them here with what the replicas held, the uptime, the miner's own standing and
the versions and model digests that served; the CLI reads the file (WAL: while the keeper writes).

Each figure is kept twice: per minute bucket (for windows: an hour, a day, 30 days; kept 35
days) and per day (kept `keep_days`). Both are sums, so a day rolls over by itself: a count
lands in the bucket and the day its time falls in.

Time: `day_s` and `origin_s` come from config, so a test runs "14 days" in seconds. Durations
(uptime, unit-hours held, emission earned) are kept in ledger time, scaled by 86400 / day_s:
with 2 s days, 2 real seconds hold a day's cost and a day's emission.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from serve_app.config import LedgerConfig, MinerConfig
from serve_app.economics.money import Held, Usage, figures
from serve_app.errors import MINER_FAILURES, REFUSALS

DAY = 86400.0
MINUTES_KEPT_DAYS = 35  # windows reach back 30 days
# Seconds: the bounds of the latency histogram kept per bucket (the router metrics' buckets).
LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COUNTS = ("requests", "admitted", "answered", "accepted", "late", "failed", "miner_failures", "retry_refusals",
          "egress_bytes")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS usage (scale TEXT, bucket INTEGER, netuid INTEGER, workload TEXT,
  {", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in COUNTS)},
  refused TEXT NOT NULL DEFAULT '{{}}', latency TEXT NOT NULL DEFAULT '[]',
  PRIMARY KEY (scale, bucket, netuid, workload));
CREATE TABLE IF NOT EXISTS held (scale TEXT, bucket INTEGER, workload TEXT,
  cpu_s REAL NOT NULL DEFAULT 0, gpu_s REAL NOT NULL DEFAULT 0, replica_s REAL NOT NULL DEFAULT 0,
  PRIMARY KEY (scale, bucket, workload));
CREATE TABLE IF NOT EXISTS standing (scale TEXT, bucket INTEGER, netuid INTEGER,
  seconds REAL NOT NULL DEFAULT 0, incentive_s REAL NOT NULL DEFAULT 0,
  tao_seconds REAL NOT NULL DEFAULT 0, tao_per_day_s REAL NOT NULL DEFAULT 0,
  PRIMARY KEY (scale, bucket, netuid));
CREATE TABLE IF NOT EXISTS uptime (scale TEXT, bucket INTEGER, seconds REAL NOT NULL DEFAULT 0,
  PRIMARY KEY (scale, bucket));
CREATE TABLE IF NOT EXISTS builds (day INTEGER, kind TEXT, name TEXT, value TEXT,
  PRIMARY KEY (day, kind, name, value));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS simulations (at REAL, netuid INTEGER, line TEXT);
"""
SIMULATIONS_SHOWN = 10  # the latest simulator runs `ledger` lists


class LedgerError(Exception):
    """The ledger file cannot be read or written: one line for the operator."""


@dataclass(frozen=True)
class Clock:
    """Ledger days: day d spans [origin + d x day_s, origin + (d+1) x day_s) of real time."""

    day_s: float = DAY
    origin_s: float = 0.0
    now: Callable[[], float] = time.time

    @classmethod
    def of(cls, cfg: LedgerConfig, now: Callable[[], float] = time.time) -> "Clock":
        return cls(cfg.day_s, cfg.origin_s, now)

    @property
    def scale(self) -> float:
        """Ledger seconds per real second."""
        return DAY / self.day_s

    @property
    def bucket_s(self) -> float:
        return self.day_s / 1440  # a minute of a ledger day

    def day(self, t: float) -> int:
        return math.floor((t - self.origin_s) / self.day_s)

    def bucket(self, t: float) -> int:
        return math.floor((t - self.origin_s) / self.bucket_s)

    def day_start(self, day: int) -> float:
        return self.origin_s + day * self.day_s

    def label(self, day: int) -> str:
        if self.day_s == DAY:
            return time.strftime("%Y-%m-%d", time.gmtime(self.day_start(day)))
        return f"day {day}"


def latency_histogram(seconds: Iterable[float]) -> list[int]:
    counts = [0] * (len(LATENCY_BOUNDS) + 1)
    for s in seconds:
        counts[next((i for i, bound in enumerate(LATENCY_BOUNDS) if s <= bound), len(LATENCY_BOUNDS))] += 1
    return counts


def quantile(counts: list[int], q: float) -> Optional[float]:
    """Prometheus's histogram_quantile on one histogram: linear inside the bucket; the top bound
    for the overflow bucket."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(LATENCY_BOUNDS):
                return LATENCY_BOUNDS[-1]
            low = LATENCY_BOUNDS[i - 1] if i else 0.0
            return low + (LATENCY_BOUNDS[i] - low) * (rank - seen) / n
        seen += n
    return LATENCY_BOUNDS[-1]


def merge_counts(a: list[int], b: list[int]) -> list[int]:
    if len(a) < len(b):
        a, b = b, a
    return [x + (b[i] if i < len(b) else 0) for i, x in enumerate(a)]


class Tally:
    """A router replica's counts since it last handed them on: (netuid, workload) -> counts.
    Bounded by the routes, whatever the traffic."""

    def __init__(self) -> None:
        self.rows: dict[tuple[int, str], dict] = {}

    def record(self, netuid: int, workload: str, outcome: str, admitted: bool, seconds: float, response_bytes: int,
               slo_latency_s: float) -> None:
        row = self._row(netuid, workload)
        row["requests"] += 1
        row["egress_bytes"] += response_bytes
        if outcome == "ok":
            row["answered"] += 1
            row["latency"] = merge_counts(row["latency"], latency_histogram([seconds]))
        if admitted:
            row["admitted"] += 1
            if outcome == "ok":
                row["accepted" if seconds <= slo_latency_s else "late"] += 1
            else:
                row["failed"] += 1
                row["miner_failures"] += outcome in MINER_FAILURES
        if outcome != "ok":  # every kind, before admission (auth, rate limits) and after (shedding, breakers)
            row["refused"][outcome] = row["refused"].get(outcome, 0) + 1
            row["retry_refusals"] += outcome in REFUSALS  # sent with Retry-After: the caller comes back

    def _row(self, netuid: int, workload: str) -> dict:
        return self.rows.setdefault((netuid, workload), {c: 0 for c in COUNTS} | {"refused": {}, "latency": []})

    def refused_at_edge(self, netuid: int, workload: str, outcome: str, count: int) -> None:
        """`count` requests HAProxy refused on a route before they reached a router (serve_app/router/edge.py)."""
        row = self._row(netuid, workload)
        row["requests"] += count
        row["refused"][outcome] = row["refused"].get(outcome, 0) + count
        row["retry_refusals"] += count if outcome in REFUSALS else 0

    def take(self) -> list[dict]:
        """The counts as plain rows (for a Ray call), and a fresh start."""
        rows, self.rows = self.rows, {}
        return [{"netuid": netuid, "workload": workload, **row} for (netuid, workload), row in rows.items()]

    def give_back(self, rows: list[dict]) -> None:
        """Rows whose hand-over failed: counted again with the next."""
        for row in rows:
            mine = self._row(row["netuid"], row["workload"])
            for c in COUNTS:
                mine[c] += row[c]
            for code, n in row["refused"].items():
                mine["refused"][code] = mine["refused"].get(code, 0) + n
            mine["latency"] = merge_counts(mine["latency"], row["latency"])


class Ledger:
    """The SQLite file. One writer (the keeper); readers (the CLI, tests) open it read-only."""

    def __init__(self, path: str | Path, clock: Clock, keep_days: int = 400, readonly: bool = False):
        self.path = Path(path).expanduser()
        self.clock = clock
        self.keep_days = keep_days
        try:
            if readonly:
                if not self.path.exists():
                    raise LedgerError(f"no ledger at {self.path}: the miner writes it while it runs "
                                      f"(ledger.path in the serve config)")
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, timeout=10, check_same_thread=False)  # the keeper serialises its threads
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; no fsync per hand-over
                self.db.executescript(SCHEMA)
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('started_at', ?)", (repr(clock.now()),))
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('days', ?)", (f"{clock.day_s!r} {clock.origin_s!r}",))
                self.db.commit()
            kept = self.db.execute("SELECT value FROM meta WHERE key='days'").fetchone()
            if kept and kept[0] != f"{clock.day_s!r} {clock.origin_s!r}":
                raise LedgerError(f"the ledger {self.path} counts days of {kept[0].split()[0]} s from "
                                  f"{kept[0].split()[1]}, the config {clock.day_s!r} s from {clock.origin_s!r}: "
                                  f"its buckets would mean other times; give ledger.path a new file")
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(f"cannot open the ledger {self.path}: {exc}") from None

    def close(self) -> None:
        self.db.close()

    # -- writing (the keeper) ---------------------------------------------------------------

    def _keys(self, t: float) -> tuple[tuple[str, int], tuple[str, int]]:
        return ("m", self.clock.bucket(t)), ("d", self.clock.day(t))

    def add_usage(self, rows: list[dict], t: Optional[float] = None) -> None:
        t = self.clock.now() if t is None else t
        with self.db:
            for scale, bucket in self._keys(t):
                for row in rows:
                    key = (scale, bucket, row["netuid"], row["workload"])
                    found = self.db.execute("SELECT refused, latency FROM usage WHERE scale=? AND bucket=? AND "
                                            "netuid=? AND workload=?", key).fetchone()
                    refused, latency = (json.loads(found[0]), json.loads(found[1])) if found else ({}, [])
                    for code, n in row["refused"].items():
                        refused[code] = refused.get(code, 0) + n
                    self.db.execute(
                        "INSERT INTO usage (scale, bucket, netuid, workload) VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                        key)
                    self.db.execute(
                        f"UPDATE usage SET {', '.join(f'{c}={c}+?' for c in COUNTS)}, refused=?, latency=? "
                        f"WHERE scale=? AND bucket=? AND netuid=? AND workload=?",
                        (*(row[c] for c in COUNTS), json.dumps(refused),
                         json.dumps(merge_counts(latency, row["latency"])), *key))

    def add_held(self, held: dict[str, tuple[float, float, float]], real_s: float, up: bool = True,
                 t: Optional[float] = None) -> None:
        """workload -> (cpu units, gpu units, replicas) held for the last `real_s` seconds; `up`: the
        miner could serve all that time (its uptime)."""
        t = self.clock.now() if t is None else t
        s = real_s * self.clock.scale
        with self.db:
            for scale, bucket in self._keys(t):
                for workload, (cpu, gpu, replicas) in held.items():
                    self.db.execute("INSERT INTO held VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                                    "cpu_s=cpu_s+excluded.cpu_s, gpu_s=gpu_s+excluded.gpu_s, "
                                    "replica_s=replica_s+excluded.replica_s",
                                    (scale, bucket, workload, cpu * s, gpu * s, replicas * s))
                if up:
                    self.db.execute("INSERT INTO uptime VALUES (?,?,?) ON CONFLICT DO UPDATE SET "
                                    "seconds=seconds+excluded.seconds", (scale, bucket, s))

    def add_standing(self, standing: dict[int, dict], real_s: float, t: Optional[float] = None) -> None:
        """netuid -> {incentive, tao_per_day (None: the price is unknown)} for the last `real_s` seconds."""
        t = self.clock.now() if t is None else t
        s = real_s * self.clock.scale
        with self.db:
            for scale, bucket in self._keys(t):
                for netuid, own in standing.items():
                    tao = own.get("tao_per_day")
                    self.db.execute("INSERT INTO standing VALUES (?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                                    "seconds=seconds+excluded.seconds, incentive_s=incentive_s+excluded.incentive_s, "
                                    "tao_seconds=tao_seconds+excluded.tao_seconds, "
                                    "tao_per_day_s=tao_per_day_s+excluded.tao_per_day_s",
                                    (scale, bucket, int(netuid), s, own["incentive"] * s,
                                     s if tao is not None else 0.0, (tao or 0.0) * s))

    def add_build(self, versions: Iterable[str], digests: dict[str, str], t: Optional[float] = None) -> None:
        """What served today: a version line per router build, a weights digest per workload."""
        day = self.clock.day(self.clock.now() if t is None else t)
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO builds VALUES (?,?,?,?)",
                                [(day, "version", "", v) for v in versions]
                                + [(day, "digest", w, d) for w, d in digests.items() if d])

    def add_simulation(self, line: dict) -> None:
        """A `torchrank-miner simulate --record` line (serve_app/simulate/scoring.py): what simulated
        validators scored, beside what real ones were served."""
        try:
            with self.db:
                self.db.execute("INSERT INTO simulations VALUES (?,?,?)",
                                (line.get("at") or self.clock.now(), line.get("netuid"), json.dumps(line)))
        except sqlite3.Error as exc:  # e.g. locked past the timeout
            raise LedgerError(f"cannot write the simulation to the ledger {self.path}: {exc}") from None

    def prune(self, t: Optional[float] = None) -> None:
        """Bounded in size: minute buckets for 35 days, days for keep_days."""
        t = self.clock.now() if t is None else t
        oldest_minute = self.clock.bucket(t - MINUTES_KEPT_DAYS * self.clock.day_s)
        oldest_day = self.clock.day(t) - self.keep_days
        with self.db:
            for table in ("usage", "held", "standing", "uptime"):
                self.db.execute(f"DELETE FROM {table} WHERE (scale='m' AND bucket<?) OR (scale='d' AND bucket<?)",
                                (oldest_minute, oldest_day))
            self.db.execute("DELETE FROM builds WHERE day<?", (oldest_day,))
            self.db.execute("DELETE FROM simulations WHERE at<?", (self.clock.day_start(oldest_day),))

    # -- reading ----------------------------------------------------------------------------

    def simulations(self, netuid: int, last: int = SIMULATIONS_SHOWN) -> list[dict]:
        """The latest simulator lines of a subnet, oldest first (none in a ledger from before them)."""
        try:
            rows = self.db.execute("SELECT line FROM simulations WHERE netuid=? ORDER BY at DESC LIMIT ?",
                                   (netuid, last)).fetchall()
        except sqlite3.OperationalError:  # a ledger written before the table existed, opened read-only
            return []
        return [json.loads(row[0]) for row in reversed(rows)]

    def started_at(self) -> Optional[float]:
        row = self.db.execute("SELECT value FROM meta WHERE key='started_at'").fetchone()
        return float(row[0]) if row else None

    def _sums(self, scale: str, low: int, high: int) -> dict:
        """The sums of buckets [low, high] of a scale, grouped by bucket: usage[(netuid, workload)] Usage
        with "latency" counts, held[workload] Held, chain_tao[netuid], standing[netuid], uptime_s."""
        q = lambda sql: self.db.execute(sql, (scale, low, high)).fetchall()  # noqa: E731
        where = "WHERE scale=? AND bucket BETWEEN ? AND ?"
        out: dict[int, dict] = {}

        def at(bucket: int) -> dict:
            return out.setdefault(bucket, {"usage": {}, "latency": {}, "held": {}, "chain_tao": {}, "standing": {},
                                           "uptime_s": 0.0})

        for row in q(f"SELECT bucket, netuid, workload, {', '.join(COUNTS)}, refused, latency FROM usage {where}"):
            bucket, netuid, workload, *counts, refused, latency = row
            b = at(bucket)
            b["usage"][(netuid, workload)] = Usage(**dict(zip(COUNTS, counts)), refused=json.loads(refused))
            b["latency"][(netuid, workload)] = json.loads(latency)
        for bucket, workload, cpu_s, gpu_s, replica_s in q(f"SELECT bucket, workload, cpu_s, gpu_s, replica_s "
                                                           f"FROM held {where}"):
            at(bucket)["held"][workload] = Held(cpu_s / 3600, gpu_s / 3600, replica_s / 3600)
        for bucket, netuid, seconds, incentive_s, tao_seconds, tao_s in q(
                f"SELECT bucket, netuid, seconds, incentive_s, tao_seconds, tao_per_day_s FROM standing {where}"):
            b = at(bucket)
            b["chain_tao"][netuid] = tao_s / DAY  # TAO a day, over the seconds it was paid
            b["standing"][netuid] = {"incentive": incentive_s / seconds if seconds else None,
                                     "tao_per_day": tao_s / tao_seconds if tao_seconds else None}
        for bucket, seconds in q(f"SELECT bucket, seconds FROM uptime {where}"):
            at(bucket)["uptime_s"] = seconds
        return out

    @staticmethod
    def _total(buckets: Iterable[dict]) -> dict:
        total = {"usage": {}, "latency": {}, "held": {}, "chain_tao": {}, "uptime_s": 0.0}
        for b in buckets:
            for key, u in b["usage"].items():
                total["usage"].setdefault(key, Usage()).add(u)
                total["latency"][key] = merge_counts(total["latency"].get(key, []), b["latency"][key])
            for w, h in b["held"].items():
                mine = total["held"].setdefault(w, Held())
                mine.cpu_hours += h.cpu_hours
                mine.gpu_hours += h.gpu_hours
                mine.replica_hours += h.replica_hours
            for netuid, tao in b["chain_tao"].items():
                total["chain_tao"][netuid] = total["chain_tao"].get(netuid, 0.0) + tao
            total["uptime_s"] += b["uptime_s"]
        return total

    def window(self, cfg: MinerConfig, seconds: float) -> dict:
        """The figures of the last `seconds` of ledger time, per subnet (money.figures: its `hours`
        are the window's part since the ledger started), with the window's p95 and uptime."""
        if seconds > MINUTES_KEPT_DAYS * DAY:
            raise LedgerError(f"a window of at most {MINUTES_KEPT_DAYS} days: the ledger keeps its minutes that "
                              f"long (`ledger` shows every day kept)")
        now = self.clock.now()
        real = seconds / self.clock.scale
        low, high = self.clock.bucket(now - real) + 1, self.clock.bucket(now)
        total = self._total(self._sums("m", low, high).values())
        # The window's part since the ledger started: ops are charged for the time there was a miner.
        started = self.started_at() or now
        covered = max(0.0, min(seconds, (now - started) * self.clock.scale))
        out = figures(cfg, total["usage"], total["held"], total["chain_tao"], covered / 3600)
        for subnet in cfg.subnets:
            counts = [0]
            for (netuid, _), latency in total["latency"].items():
                if netuid == subnet.netuid:
                    counts = merge_counts(counts, latency)
            out[subnet.netuid].update(p95_s=quantile(counts, 0.95), slo_latency_s=subnet.slo.latency_s,
                                      uptime=min(1.0, total["uptime_s"] / covered) if covered > 0 else None)
        return out

    def days(self, cfg: MinerConfig, last: Optional[int] = None) -> dict[int, list[dict]]:
        """netuid -> its day rows, oldest first, from the first day the ledger has to today
        (today so far, marked "partial"); `last`: only that many."""
        now = self.clock.now()
        today = self.clock.day(now)
        started = self.started_at()
        first = max(self.clock.day(started) if started is not None else today, today - self.keep_days + 1)
        if last is not None:
            first = max(first, today - last + 1)
        sums = self._sums("d", first, today)
        builds: dict[int, dict] = {}
        for day, kind, name, value in self.db.execute("SELECT day, kind, name, value FROM builds WHERE day>=? "
                                                      "ORDER BY value", (first,)):
            b = builds.setdefault(day, {"versions": [], "digests": {}})
            if kind == "version":
                b["versions"].append(value)
            else:
                b["digests"].setdefault(name, []).append(value)
        out: dict[int, list[dict]] = {s.netuid: [] for s in cfg.subnets}
        for day in range(first, today + 1):
            b = sums.get(day) or {"usage": {}, "latency": {}, "held": {}, "chain_tao": {}, "standing": {},
                                  "uptime_s": 0.0}
            start, end = self.clock.day_start(day), self.clock.day_start(day + 1)
            # The day's own length in ledger seconds: the first one from the ledger's start, today until now.
            span = (min(end, now) - max(start, started if started is not None else start)) * self.clock.scale
            money = figures(cfg, b["usage"], b["held"], b["chain_tao"], max(span, 0.0) / 3600)
            for subnet in cfg.subnets:
                # Partial, not judged: today, and the day the ledger started in (it saw only part of it).
                partial = day == today or (started is not None and started > start)
                out[subnet.netuid].append(day_row(subnet, day, self.clock, b, money[subnet.netuid], span,
                                                  builds.get(day, {}), partial=partial))
        return out


def day_row(subnet, day: int, clock: Clock, sums: dict, money: dict, span_s: float, build: dict,
            partial: bool) -> dict:
    """One subnet's day: counts, SLO figures (and whether they were met), standing, money, what served."""
    usage, counts = Usage(), [0]
    for (netuid, _), u in sums["usage"].items():
        if netuid == subnet.netuid:
            usage.add(u)
            counts = merge_counts(counts, sums["latency"][(netuid, _)])
    slo = subnet.slo
    availability = 1 - usage.miner_failures / usage.admitted if usage.admitted else None
    attainment = usage.accepted / usage.answered if usage.answered else None
    budget = (usage.miner_failures / usage.admitted) / (1 - slo.availability_objective) if usage.admitted else None
    uptime = min(1.0, sums["uptime_s"] / span_s) if span_s > 0 else None
    misses = []
    if uptime is None or uptime < slo.availability_objective:
        misses.append(f"uptime {0 if uptime is None else uptime:.2%} < {slo.availability_objective:.2%}")
    if availability is not None and availability < slo.availability_objective:
        misses.append(f"availability {availability:.2%} < {slo.availability_objective:.2%}")
    if attainment is not None and attainment < slo.latency_objective:
        misses.append(f"{attainment:.2%} under {slo.latency_s:g} s < {slo.latency_objective:.2%}")
    own = sums["standing"].get(subnet.netuid, {})
    held = sums["held"]
    return {
        "netuid": subnet.netuid, "day": day, "start": clock.day_start(day), "label": clock.label(day),
        "partial": partial, "requests": usage.requests, "admitted": usage.admitted, "answered": usage.answered,
        "accepted": usage.accepted, "late": usage.late, "failed": usage.failed,
        "miner_failures": usage.miner_failures, "retry_refusals": usage.retry_refusals,
        "refused": dict(sorted(usage.refused.items())), "egress_bytes": usage.egress_bytes,
        "availability": availability, "latency_attainment": attainment, "error_budget_used": budget,
        "p95_s": quantile(counts, 0.95), "slo_latency_s": slo.latency_s, "uptime": uptime,
        "slo_met": not misses, "misses": misses,
        "incentive": own.get("incentive"), "tao_per_day": own.get("tao_per_day"),
        "revenue": money["revenue"], "cost": money["cost"], "profit": money["profit"],
        "replicas": {w: round(h.replica_hours * 3600 / span_s, 3) if span_s > 0 else 0.0
                     for w, h in sorted(held.items())},
        "versions": build.get("versions", []), "digests": build.get("digests", {}),
    }


def verdict(days: list[dict], rules) -> dict:
    """The guide's readiness rules on a subnet's days (partial ones, today and the ledger's first, are
    not judged):
    hold (fewer than `stable_days` days, or an SLO missed in the last `recent_days`), stable
    (`stable_days` days in a row of SLOs met), expand (`expand_days` in a row and a profit over them)."""
    closed = [d for d in days if not d["partial"]]
    streak = 0
    for d in reversed(closed):
        if not d["slo_met"]:
            break
        streak += 1
    stretch = closed[len(closed) - streak:] if streak else []
    profits = [d["profit"] for d in stretch]
    profit = None if not profits or any(p is None for p in profits) else sum(profits)
    recent_misses = [d for d in closed[-rules.recent_days:] if not d["slo_met"]]
    out = {"days": len(closed), "stable_days": streak, "profit_stable": profit}
    if streak >= rules.expand_days and profit is not None and profit > 0:
        return {**out, "verdict": "expand", "rule": f"expand: {rules.expand_days}+ days of SLOs met (2-4 weeks "
                                                    f"stable) and a positive profit over them",
                "reasons": [f"SLOs met {streak} days in a row", f"profit over them {profit:.2f}"]}
    if streak >= rules.stable_days:
        reasons = [f"SLOs met {streak} days in a row"]
        if profit is None:
            reasons.append("no profit figure (no economics: block): expand needs a positive one")
        elif profit <= 0:
            reasons.append(f"profit over them {profit:.2f}: expand needs a positive one")
        else:
            reasons.append(f"{rules.expand_days - streak} more days like these for expand")
        return {**out, "verdict": "stable", "rule": f"stable: {rules.stable_days} days in a row of SLOs met",
                "reasons": reasons}
    if len(closed) >= rules.stable_days and not recent_misses:
        return {**out, "verdict": "hold", "rule": f"hold: not yet {rules.stable_days} days in a row of SLOs met",
                "reasons": [f"SLOs met {streak} days in a row since the last miss: stable needs {rules.stable_days}"]}
    reasons = []
    if len(closed) < rules.stable_days:
        reasons.append(f"{len(closed)} full days recorded: stable needs {rules.stable_days}")
    for d in recent_misses:
        reasons.append(f"{d['label']}: SLO missed ({'; '.join(d['misses'])})")
    return {**out, "verdict": "hold", "rule": f"hold: fewer than {rules.stable_days} days, or an SLO missed in the "
                                              f"last {rules.recent_days}", "reasons": reasons}
