"""The latency/queue autoscaling policy on hand-built AutoscalingContexts (no Ray cluster)."""

import json
import logging

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from serve_app.ops.autoscaling import (
    AT_MAX, AT_MIN, IN_BAND, LATENCY, NO_REPORTS, QUEUE, QUIET, QUIET_DONE, STARTING, LatencyQueuePolicy, LoadWindow,
    P95_KEY, QUEUED_KEY)

DEP = DeploymentID(name="Embeddings", app_name="miner")


def context(running, p95=0.0, queued=0.0, target=None, lo=1, hi=8, state=None, now=1000.0, handle_queued=0.0,
            reported=None):
    """`running` replicas that each report `p95` and `queued` (`reported` of them; default all)."""
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=DEP) for i in range(running)]
    shown = replicas[: running if reported is None else reported]
    raw = {P95_KEY: {r: [TimeStampedValue(now - 5, 99.0), TimeStampedValue(now - 1, p95)] for r in shown},
           QUEUED_KEY: {r: [TimeStampedValue(now - 1, queued)] for r in shown}} if shown else {}
    return AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name, current_num_replicas=running,
        target_num_replicas=running if target is None else target, running_replicas=replicas,
        total_num_requests=0.0, total_queued_requests=handle_queued, aggregated_metrics=None, raw_metrics=raw,
        capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi, policy_state=state or {},
        last_scale_up_time=None, last_scale_down_time=None, current_time=now,
        config=AutoscalingConfig(min_replicas=lo, max_replicas=hi))


@pytest.fixture
def policy():
    # Up at p95 > 0.8 s (1 s SLO x 0.8) or > 64 items waiting per replica; quiet below half of those.
    return LatencyQueuePolicy(latency_slo_s=1.0, target_queued=64, up_at=0.8, down_at=0.5, quiet_period_s=30,
                              max_step_up=2.0, metrics=False)


def test_scales_up_on_latency_over_the_slo(policy):
    assert policy.decide(context(2, p95=1.0), {}, 1000.0)[:2] == (3, LATENCY)  # 1.25x over: ceil(2 x 1.25)
    # The newest report counts, not older ones (the 99 s sample above).
    assert policy.decide(context(2, p95=0.5), {}, 1000.0)[1] == IN_BAND


def test_scales_up_on_queue_depth(policy):
    assert policy.decide(context(2, queued=96), {}, 1000.0)[:2] == (3, QUEUE)  # 96 per replica: 1.5x
    # Requests Serve holds at handles count as waiting work too.
    assert policy.decide(context(1, queued=10, handle_queued=100), {}, 1000.0)[:2] == (2, QUEUE)


def test_step_up_is_proportional_but_capped(policy):
    assert policy.decide(context(2, p95=8.0), {}, 1000.0)[0] == 4  # 10x over, at most 2x per step
    assert policy.decide(context(4, queued=70), {}, 1000.0)[0] == 5  # barely over: still one more


def test_never_past_max_and_waits_for_starting_replicas(policy):
    assert policy.decide(context(8, p95=5.0), {}, 1000.0)[:2] == (8, AT_MAX)
    assert policy.decide(context(7, p95=5.0, hi=8), {}, 1000.0)[0] == 8
    # Asked for 4, 2 running: no further step until they are up.
    assert policy.decide(context(2, p95=5.0, target=4), {}, 1000.0)[:2] == (4, STARTING)


def test_holds_in_the_band_between_watermarks(policy):
    state = {}
    for p95, queued in ((0.79, 0), (0.41, 0), (0.1, 40), (0.6, 63)):
        assert policy.decide(context(3, p95=p95, queued=queued), state, 1000.0)[:2] == (3, IN_BAND)
    assert "quiet_since" not in state


def test_scales_down_only_after_the_quiet_period(policy):
    state = {}
    assert policy.decide(context(3, p95=0.1), state, 1000.0)[:2] == (3, QUIET)
    assert policy.decide(context(3, p95=0.1), state, 1029.0)[:2] == (3, QUIET)
    assert policy.decide(context(3, p95=0.1), state, 1030.0)[:2] == (2, QUIET_DONE)
    # One step at a time: the next one needs its own quiet period.
    assert policy.decide(context(2, p95=0.1), state, 1031.0)[:2] == (2, QUIET)
    assert policy.decide(context(2, p95=0.1), state, 1060.0)[:2] == (1, QUIET_DONE)
    assert policy.decide(context(1, p95=0.0), state, 2000.0)[:2] == (1, AT_MIN)


def test_a_blip_restarts_the_quiet_period(policy):
    state = {}
    policy.decide(context(3, p95=0.1), state, 1000.0)
    assert policy.decide(context(3, p95=0.6), state, 1020.0)[:2] == (3, IN_BAND)  # back in the band
    assert policy.decide(context(3, p95=0.1), state, 1031.0)[:2] == (3, QUIET)  # counts from 1031 again
    assert policy.decide(context(3, p95=0.1), state, 1061.0)[:2] == (2, QUIET_DONE)


def test_no_scale_down_when_one_replica_fewer_would_queue(policy):
    # 60 items waiting on 3 replicas: 30 each on 2 replicas, under the low watermark (32).
    assert policy.decide(context(3, queued=20), {}, 1000.0)[1] == QUIET
    # 66 items: 33 each on 2 replicas, over the low watermark: hold.
    assert policy.decide(context(3, queued=22), {}, 1000.0)[1] == IN_BAND


def test_never_below_min_and_waits_for_reports(policy):
    assert policy.decide(context(2, p95=0.0, lo=2), {}, 5000.0)[:2] == (2, AT_MIN)
    assert policy.decide(context(1, lo=2), {}, 1000.0)[0] == 2
    # Replicas that have not reported yet: no decision either way.
    assert policy.decide(context(2, target=2, reported=0), {}, 1000.0)[:2] == (2, NO_REPORTS)


def test_call_returns_state_and_logs_one_line_per_change(policy, caplog):
    caplog.set_level(logging.INFO, logger="ray.serve")
    desired, state = policy(context(2, p95=2.0))
    assert desired == 4 and isinstance(state, dict)
    policy(context(2, p95=2.0, now=1000.5))  # same decision and reason: not logged again
    policy(context(4, p95=0.5, now=1001.0))
    lines = [json.loads(r.getMessage()) for r in caplog.records if "autoscaling_decision" in r.getMessage()]
    assert [(l["decision"], l["reason"], l["replicas"]) for l in lines] == [("up", LATENCY, 4), ("hold", IN_BAND, 4)]
    assert lines[0]["deployment"] == "Embeddings" and lines[0]["inputs"]["p95_s"] == 2.0


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        LatencyQueuePolicy(latency_slo_s=1.0, target_queued=8, down_at=1.5)


def test_load_window_p95_and_stalled_requests():
    now = [0.0]
    window = LoadWindow(window_s=10.0, clock=lambda: now[0])
    for i in range(20):
        with window.track():
            now[0] += 0.1 if i < 19 else 2.0  # one slow request in 20: the p95
    assert window.p95() == pytest.approx(0.1)
    with window.track():
        now[0] += 1.0
    assert window.p95() == pytest.approx(1.0)
    now[0] += 20  # all finished long ago: nothing in the window
    assert window.stats(queued=3) == {P95_KEY: 0.0, QUEUED_KEY: 3.0}
    # A request still running counts with its age: a stall shows before it ends.
    tracked = window.track()
    tracked.__enter__()
    now[0] += 4.0
    assert window.p95() == pytest.approx(4.0)
    tracked.__exit__(None, None, None)


def test_load_window_stays_bounded_without_p95_reads():
    # A replica without autoscaling is never asked for its p95: finished requests must still be forgotten.
    now = [0.0]
    window = LoadWindow(window_s=10.0, clock=lambda: now[0])
    for _ in range(1000):
        with window.track():
            now[0] += 0.1
    assert len(window._done) <= 101
