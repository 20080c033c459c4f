"""The consistency ledger (serve_app/economics/ledger.py) on compressed time: days of 100
seconds on a clock the test moves, so "21 days" take no time at all."""

import pytest

from serve_app.config import LedgerConfig, MinerConfig, VerdictRules
from serve_app.economics.ledger import Clock, Ledger, LedgerError, Tally, quantile, verdict

SNAPSHOT = {"source": "snapshot", "path": "deployments/local-metagraph.json"}
DAY_S = 100.0


class FakeTime:
    def __init__(self, t=10_000.0):
        self.t = t

    def __call__(self):
        return self.t


def config(**over):
    args = {"wallet": {"uri": "//Bob"},
            "subnets": [{"netuid": 1, "metagraph": SNAPSHOT, "reward": {"per_task_tao": 0.01},
                         "slo": {"latency_s": 0.5, "latency_objective": 0.9, "availability_objective": 0.99}},
                        {"netuid": 2, "prefix": "/b", "metagraph": SNAPSHOT}],
            "economics": {"tao_price": 100, "prices": {"cpu_per_hour": 3.6}},
            "ledger": {"day_s": DAY_S}}
    args.update(over)
    return MinerConfig.model_validate(args)


@pytest.fixture
def now():
    return FakeTime()


@pytest.fixture
def ledger(tmp_path, now):
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite", Clock(DAY_S, 0.0, now))
    yield ledger
    ledger.close()


def traffic(netuid=1, ok=10, slow=0, failed=0, refused=0, seconds=0.1):
    tally = Tally()
    for _ in range(ok):
        tally.record(netuid, "embeddings", "ok", True, seconds, 100, 0.5)
    for _ in range(slow):
        tally.record(netuid, "embeddings", "ok", True, 2.0, 100, 0.5)
    for _ in range(failed):
        tally.record(netuid, "embeddings", "internal_error", True, 0.2, 50, 0.5)
    for _ in range(refused):
        tally.record(netuid, "embeddings", "rate_limited", False, 0.001, 40, 0.5)
    return tally.take()


def run_day(ledger, now, *, up=True, **counts):
    """One ledger day of the miner: its counts, and the keeper's samples every 10 s (1 CPU held)."""
    start = ledger.clock.day_start(ledger.clock.day(now.t))
    now.t = start + 1
    ledger.add_usage(traffic(**counts))
    for i in range(10):
        now.t = start + (i + 1) * 10 - 0.5
        ledger.add_held({"embeddings": (1.0, 0.0, 1)}, 10, up=up)
    now.t = start + DAY_S + 0.5  # the next day


def test_tally_counts_by_outcome_and_admission():
    tally = Tally()
    tally.record(1, "embeddings", "ok", True, 0.1, 10, 0.5)
    tally.record(1, "embeddings", "ok", True, 0.9, 10, 0.5)
    tally.record(1, "embeddings", "shed", True, 0.01, 5, 0.5)
    tally.record(1, "embeddings", "not_registered", False, 0.01, 5, 0.5)
    (row,) = tally.take()
    assert {k: row[k] for k in ("requests", "admitted", "answered", "accepted", "late", "failed", "miner_failures",
                                "retry_refusals", "egress_bytes")} == {
        "requests": 4, "admitted": 3, "answered": 2, "accepted": 1, "late": 1, "failed": 1, "miner_failures": 1,
        "retry_refusals": 1, "egress_bytes": 30}
    assert row["refused"] == {"shed": 1, "not_registered": 1}
    assert tally.take() == []
    tally.give_back([row])
    assert tally.take()[0]["requests"] == 4


def test_a_day_rolls_over_by_itself_and_survives_a_restart(tmp_path, now):
    cfg = config()
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path, Clock(DAY_S, 0.0, now))
    now.t = 10_050.0  # day 100, half way
    ledger.add_usage(traffic(ok=5))
    now.t = 10_150.0  # day 101
    ledger.add_usage(traffic(ok=7, failed=1))
    ledger.close()
    reopened = Ledger(path, Clock(DAY_S, 0.0, now), readonly=True)
    days = reopened.days(cfg)[1]
    assert [(d["day"], d["requests"], d["partial"]) for d in days] == [(100, 5, False), (101, 8, True)]
    assert days[1]["availability"] == pytest.approx(7 / 8)
    assert days[0]["label"] == "day 100"
    assert [d["requests"] for d in reopened.days(cfg)[2]] == [0, 0]  # subnet 2 had none


def test_slo_figures_of_a_day(ledger, now):
    cfg = config()
    run_day(ledger, now, ok=80, slow=10, failed=10, refused=5)
    (day, today) = ledger.days(cfg)[1]
    assert day["requests"] == 105 and day["admitted"] == 100 and day["accepted"] == 80 and day["late"] == 10
    assert day["availability"] == pytest.approx(0.90)
    assert day["latency_attainment"] == pytest.approx(80 / 90)
    # 10 % failed against a budget of 1 %: ten budgets used.
    assert day["error_budget_used"] == pytest.approx(10.0)
    assert day["refused"] == {"internal_error": 10, "rate_limited": 5}
    assert day["p95_s"] > 0.5  # the slow tenth: 2 s answers land in the (1, 2.5] bucket
    assert not day["slo_met"] and len(day["misses"]) == 2
    assert day["uptime"] == pytest.approx(1.0)
    # Money: 80 accepted x 0.01 TAO x 100 = 80; a CPU held the whole day of 86,400 ledger seconds = 24 h x 3.6.
    assert day["revenue"] == pytest.approx(80.0)
    assert day["cost"] == pytest.approx(24 * 3.6 * 100 / 100, rel=0.01)
    assert day["replicas"] == {"embeddings": pytest.approx(1.0)}


def test_downtime_misses_the_day(ledger, now):
    cfg = config()
    run_day(ledger, now, ok=10, up=False)
    day = ledger.days(cfg)[1][0]
    assert day["uptime"] == 0 and not day["slo_met"] and "uptime" in day["misses"][0]


def test_windows_sum_the_minutes_inside_them(ledger, now):
    cfg = config()
    run_day(ledger, now, ok=10)  # yesterday
    now.t += 20  # 20 s (4.8 ledger hours) into today
    ledger.add_usage(traffic(ok=3))
    hour = ledger.window(cfg, 3600)[1]  # an hour of ledger time: the last 4.17 s
    assert hour["tasks"] == 3
    both = ledger.window(cfg, 2 * 86400)[1]
    assert both["tasks"] == 13 and both["accepted"] == 13


def test_builds_line_up_with_the_days(ledger, now):
    cfg = config()
    ledger.add_build(["0.1.0 abc"], {"embeddings": "1111"})
    now.t += DAY_S
    ledger.add_build(["0.2.0 def"], {"embeddings": "2222"})
    first, second = ledger.days(cfg)[1]
    assert first["versions"] == ["0.1.0 abc"] and second["digests"] == {"embeddings": ["2222"]}


def test_standing_is_averaged_over_the_time_it_held(ledger, now):
    cfg = config(subnets=[{"netuid": 1, "metagraph": SNAPSHOT, "reward": {"source": "chain"}}])
    ledger.add_standing({1: {"incentive": 0.2, "tao_per_day": 1.0}}, 50)
    ledger.add_standing({1: {"incentive": 0.4, "tao_per_day": 3.0}}, 50)
    day = ledger.days(cfg)[1][0]
    assert day["incentive"] == pytest.approx(0.3) and day["tao_per_day"] == pytest.approx(2.0)
    # 100 real seconds = a whole ledger day at 2 TAO a day, at 100 USD.
    assert day["revenue"] == pytest.approx(200.0)


def test_old_rows_are_pruned(ledger, now):
    cfg = config(ledger={"day_s": DAY_S, "keep_days": 35})
    ledger.keep_days = 35
    ledger.add_usage(traffic(ok=1))
    now.t += 40 * DAY_S
    ledger.add_usage(traffic(ok=1))
    ledger.prune()
    rows = ledger.db.execute("SELECT scale, COUNT(*) FROM usage GROUP BY scale").fetchall()
    assert dict(rows) == {"d": 1, "m": 1}
    assert sum(d["requests"] for d in ledger.days(cfg)[1]) == 1


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(LedgerError, match="no ledger at .*ledger.path"):
        Ledger(tmp_path / "none.sqlite", Clock(), readonly=True)


def test_quantile_interpolates_like_prometheus():
    # 10 answers in (0.05, 0.1], 10 in (0.1, 0.25]: the median is 0.1, p95 0.1 + 0.15 x 9/10.
    counts = [0] * 14
    counts[4], counts[5] = 10, 10
    assert quantile(counts, 0.5) == pytest.approx(0.1)
    assert quantile(counts, 0.95) == pytest.approx(0.235)
    assert quantile([0] * 14, 0.95) is None


RULES = VerdictRules()  # 14 stable, 7 recent, 21 expand


def days(*met, profit=1.0):
    rows = [{"label": f"day {i}", "slo_met": m, "misses": [] if m else ["availability 90% < 99%"],
             "profit": profit, "partial": False} for i, m in enumerate(met)]
    return rows + [{"label": "today", "slo_met": False, "misses": ["x"], "profit": -5.0, "partial": True}]


def test_verdict_holds_with_too_few_days():
    v = verdict(days(*[True] * 9), RULES)
    assert v["verdict"] == "hold" and v["stable_days"] == 9
    assert "9 full days recorded: stable needs 14" in v["reasons"]


def test_verdict_holds_after_a_recent_miss():
    v = verdict(days(*[True] * 20, False, *[True] * 3), RULES)
    assert v["verdict"] == "hold" and any("day 20: SLO missed" in r for r in v["reasons"])


def test_verdict_stable_after_fourteen_days_then_expand_with_a_profit():
    assert verdict(days(*[True] * 14), RULES)["verdict"] == "stable"
    v = verdict(days(False, *[True] * 21), RULES)
    assert v["verdict"] == "expand" and v["stable_days"] == 21 and v["profit_stable"] == pytest.approx(21.0)
    loss = verdict(days(*[True] * 25, profit=-1.0), RULES)
    assert loss["verdict"] == "stable" and "expand needs a positive one" in loss["reasons"][1]
    no_money = verdict(days(*[True] * 25, profit=None), RULES)
    assert no_money["verdict"] == "stable"


def test_verdict_over_compressed_weeks_from_the_ledger(ledger, now):
    cfg = config(ledger={"day_s": DAY_S, "verdict": {"stable_days": 14, "recent_days": 7, "expand_days": 21}})
    for i in range(22):
        run_day(ledger, now, ok=100)
    v = verdict(ledger.days(cfg)[1], cfg.ledger.verdict)
    assert v["verdict"] == "expand" and v["days"] == 22
    run_day(ledger, now, ok=50, failed=50)
    assert verdict(ledger.days(cfg)[1], cfg.ledger.verdict)["verdict"] == "hold"


def test_verdict_rules_are_ordered():
    with pytest.raises(ValueError, match="stable_days"):
        LedgerConfig(verdict={"stable_days": 30, "expand_days": 21})


def test_a_window_charges_ops_only_since_the_ledger_started(ledger, now):
    cfg = config(economics={"tao_price": 100, "ops_per_month": 730})  # 1 an hour, half each subnet
    now.t += DAY_S / 24  # a ledger hour after the ledger started
    day = ledger.window(cfg, 86400)[1]
    assert day["hours"] == pytest.approx(1.0) and day["cost"] == pytest.approx(0.5)


def test_the_first_day_is_partial_when_the_ledger_started_inside_it(tmp_path, now):
    now.t = 10_095.0  # the last 5 s of day 100
    ledger = Ledger(tmp_path / "late.sqlite", Clock(DAY_S, 0.0, now))
    ledger.add_held({"embeddings": (1.0, 0.0, 1)}, 5)
    now.t = 10_150.0
    first, today = ledger.days(config())[1]
    assert first["partial"] and first["uptime"] == pytest.approx(1.0) and today["partial"]
    assert verdict([first, today], RULES)["days"] == 0  # five minutes are not a day of consistency


def test_a_ledger_refuses_another_day_length(tmp_path, now):
    Ledger(tmp_path / "l.sqlite", Clock(DAY_S, 0.0, now)).close()
    with pytest.raises(LedgerError, match="days of 100.0 s .* give ledger.path a new file"):
        Ledger(tmp_path / "l.sqlite", Clock(86400.0, 0.0, now))


def test_days_older_than_keep_days_are_not_shown(tmp_path, now):
    ledger = Ledger(tmp_path / "k.sqlite", Clock(DAY_S, 0.0, now), keep_days=35)
    now.t += 50 * DAY_S
    assert len(ledger.days(config())[1]) == 35


def test_hold_names_its_rule_when_the_run_since_a_miss_is_short():
    v = verdict(days(*[True] * 10, False, *[True] * 8), RULES)
    assert v["verdict"] == "hold" and v["rule"] == "hold: not yet 14 days in a row of SLOs met"
    assert v["reasons"] == ["SLOs met 8 days in a row since the last miss: stable needs 14"]
