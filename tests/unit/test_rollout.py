"""Rollout decisions (serve_app/ops/rollout.py) on hand-built comparison streams, and the
router side's choice of side and fallback (serve_app/router/rollouts.py) on fake handles."""

import asyncio
import time

import numpy as np
import pytest
from pydantic import ValidationError

from serve_app.config import CanaryConfig, EmbeddingsConfig
from serve_app.errors import ApiError, ErrorCode
from serve_app.ops.rollout import (CANARY, PROMOTED, ROLLED_BACK, SHADOW, Observation, Rollout, on_candidate)
from serve_app.protocols.embeddings import OpenAIEmbeddings
from serve_app.router.rollouts import RolloutBook, RolloutRouter

FAST = CanaryConfig(model="/models/candidate", weight=0.5, steps=(0.2, 1.0), step_s=10.0, min_comparisons=5,
                    min_samples=5)


def agreeing(n, seconds=0.02):
    return [Observation(stable_s=seconds, stable_failed=False, candidate_s=seconds, candidate_failed=False,
                        agree=True, measure=0.9999) for _ in range(n)]


def run(rollout, batches, start=0.0, every_s=1.0):
    """Feed one batch per report, `every_s` apart; the decisions, in order."""
    decisions = []
    for i, batch in enumerate(batches):
        decision = rollout.observe(batch, {"stable": len(batch), "candidate": 0}, start + i * every_s)
        if decision:
            decisions.append(decision)
    return decisions


def test_a_candidate_that_agrees_steps_through_the_schedule_and_is_promoted():
    r = Rollout("embeddings", FAST, "stable", "candidate")
    assert (r.state, r.weight) == (SHADOW, 0.0)
    decisions = run(r, [agreeing(2)] * 40)
    assert decisions == [CANARY, CANARY, PROMOTED]
    assert r.weight == 1.0 and "promoted" in r.reason
    # Each stage took step_s of traffic: shadow and two steps, 10 s each, reported each second.
    assert r.decided_after_s == pytest.approx(30.0, abs=1.5)


def test_the_weight_follows_the_steps():
    r = Rollout("embeddings", FAST, "stable", "candidate")
    run(r, [agreeing(2)] * 12)
    assert r.state == CANARY and r.weight == pytest.approx(0.5 * 0.2)
    run(r, [agreeing(2)] * 10, start=12)
    assert r.weight == pytest.approx(0.5 * 1.0)


def test_a_stage_needs_its_comparisons_not_only_its_time():
    r = Rollout("embeddings", FAST, "stable", "candidate")
    run(r, [agreeing(0) + [Observation(stable_s=0.01, stable_failed=False)]] * 30)  # traffic, nothing compared
    assert r.state == SHADOW


def test_idle_time_does_not_count():
    r = Rollout("embeddings", FAST, "stable", "candidate")
    run(r, [agreeing(5)], start=0)
    run(r, [agreeing(5)], start=1000)  # a quiet half hour is not ten seconds of traffic
    assert r.state == SHADOW and r.traffic_s <= 2.0


def test_disagreement_rolls_back_at_once_with_the_worst_cosine():
    r = Rollout("embeddings", FAST, "stable", "candidate")
    bad = [Observation(stable_s=0.02, stable_failed=False, candidate_s=0.02, candidate_failed=False, agree=False,
                       measure=0.31)] * 5
    assert run(r, [bad]) == [ROLLED_BACK]
    assert r.reason.startswith("disagrees: 5 of 5") and "0.310" in r.reason
    assert r.weight == 0.0


def test_a_little_disagreement_is_tolerated():
    r = Rollout("embeddings", FAST, "stable", "candidate")
    one_off = agreeing(39) + [Observation(stable_s=0.02, stable_failed=False, candidate_s=0.02,
                                          candidate_failed=False, agree=False, measure=0.98)]
    assert run(r, [one_off]) == []  # 97.5 % agree, over min_agreement (95 %)


def test_errors_beyond_stables_roll_back_in_canary_too():
    r = Rollout("embeddings", FAST, "stable", "candidate")
    run(r, [agreeing(2)] * 12)
    assert r.state == CANARY
    failing = [Observation(candidate_s=0.5, candidate_failed=True)] * 5
    assert run(r, [failing], start=12) == [ROLLED_BACK]
    assert r.reason.startswith("fails more")


def test_one_transient_error_or_disagreement_is_not_a_verdict():
    r = Rollout("embeddings", FAST, "stable", "candidate")
    once = agreeing(9) + [Observation(candidate_s=0.5, candidate_failed=True),
                          Observation(stable_s=0.02, stable_failed=False, candidate_s=0.02, candidate_failed=False,
                                      agree=False, measure=0.5)]
    assert run(r, [once]) == []  # 10 % failed and 10 % disagreed, but one of each


def test_errors_as_frequent_as_stables_are_not_the_candidates_fault():
    r = Rollout("agents", FAST, "stable", "candidate")
    both_fail = [Observation(stable_s=1.0, stable_failed=True, candidate_s=1.0, candidate_failed=True)] * 20
    assert run(r, [both_fail]) == []


def test_a_slower_candidate_rolls_back():
    r = Rollout("embeddings", FAST, "stable", "candidate")
    slow = [Observation(stable_s=0.02, stable_failed=False, candidate_s=0.30, candidate_failed=False, agree=True)] * 19
    assert run(r, [slow]) == []  # a p95 of fewer than 20 pairs is one or two calls: no verdict yet
    assert run(r, [slow[:1]], start=1) == [ROLLED_BACK]
    assert r.reason.startswith("slower: p95 300 ms")


def test_latency_within_ratio_and_slack_holds():
    r = Rollout("embeddings", FAST, "stable", "candidate")
    close = [Observation(stable_s=0.02, stable_failed=False, candidate_s=0.08, candidate_failed=False,
                         agree=True)] * 20  # 0.08 < 2 x 0.02 + 0.05
    assert run(r, [close]) == []


def test_a_decided_rollout_takes_no_more_decisions():
    r = Rollout("embeddings", FAST, "stable", "candidate")
    r.promote("by hand")
    bad = [Observation(stable_s=0.02, stable_failed=False, candidate_s=0.02, candidate_failed=False, agree=False)] * 9
    assert run(r, [bad]) == [] and r.state == PROMOTED


def test_assignment_is_sticky_as_the_weight_grows():
    hotkeys = [f"5Hotkey{i}" for i in range(2000)]
    at = {w: {h for h in hotkeys if on_candidate(h, w, "embeddings:x")} for w in (0.05, 0.25, 0.5, 1.0)}
    assert at[0.05] <= at[0.25] <= at[0.5] <= at[1.0] == set(hotkeys)
    assert 0.4 < len(at[0.5]) / len(hotkeys) < 0.6
    other = {h for h in hotkeys if on_candidate(h, 0.5, "embeddings:y")}
    assert other != at[0.5]  # another rollout picks other validators


def test_canary_steps_must_rise_to_one():
    for steps in ((0.5,), (0.5, 0.2, 1.0), (0.0, 1.0), (0.5, 1.5)):
        with pytest.raises(ValidationError, match="steps must rise"):
            CanaryConfig(model="m", steps=steps)


def test_the_candidates_config_takes_the_canary_model_overrides_and_placement():
    cfg = EmbeddingsConfig.model_validate({"runtime": {"torch_threads": 2}, "canary": {
        "model": "/models/new", "overrides": {"runtime": {"precision": "fp32"}},
        "placement": {"num_cpus": 0.25}}})
    candidate = cfg.candidate()
    assert candidate.model.id == "/models/new" and candidate.canary is None
    assert candidate.runtime.precision == "fp32" and candidate.runtime.torch_threads == 2
    assert candidate.placement.num_cpus == 0.25 and cfg.placement.num_cpus == 1.0


KEY = RolloutBook.key(FAST.model_dump_json(), "stable", "candidate")


def test_the_book_keeps_a_known_rollout_and_starts_a_new_one():
    book = RolloutBook()
    book.begin("embeddings", FAST.model_dump_json(), "stable", "candidate")
    book.report("embeddings", KEY, agreeing(2), {"stable": 2})
    assert book.states()["embeddings"]["comparisons"] == 2
    book.begin("embeddings", FAST.model_dump_json(), "stable", "candidate")  # a router restarting
    assert book.states()["embeddings"]["comparisons"] == 2
    book.begin("embeddings", FAST.model_dump_json(), "stable", "another")  # a new candidate
    assert book.states()["embeddings"]["comparisons"] == 0
    # A router still on the old config (a rolling restart) feeds nothing into the new rollout.
    assert book.report("embeddings", KEY, agreeing(5), {"stable": 5}) is None
    assert book.states()["embeddings"]["comparisons"] == 0


def test_a_decision_is_claimed_by_exactly_one_router():
    book = RolloutBook()
    book.begin("embeddings", FAST.model_dump_json(), "stable", "candidate")
    assert not book.claim("embeddings", KEY)  # nothing decided yet
    assert book.decide("embeddings", "rollback", "by the operator")["state"] == ROLLED_BACK
    with pytest.raises(ValueError, match="already rolled_back"):
        book.decide("embeddings", "promote", "by the operator")
    with pytest.raises(ValueError, match="no rollout of agents"):
        book.decide("agents", "promote", "by the operator")
    assert book.states()["embeddings"]["decided_by"] == "operator"
    assert not book.claim("agents", KEY) and not book.claim("embeddings", "another rollout")
    assert [book.claim("embeddings", KEY) for _ in range(3)] == [True, False, False]


class FakeMetrics:
    class Any:
        def inc(self, *a):
            pass

        def observe(self, *a):
            pass

        def set(self, *a):
            pass

    def __getattr__(self, name):
        return self.Any()


class Book:
    """A coordinator as the router calls it: methods with .remote() returning awaitables."""

    def __init__(self):
        self.book = RolloutBook()

    def __getattr__(self, name):
        method = getattr(self.book, name)

        class Remote:
            @staticmethod
            async def remote(*args):
                return method(*args)

        return Remote


def vectors(value):
    return {"data": [{"embedding": np.array([value, 1.0], dtype=np.float32)}]}


def router(canary, stable_answer, candidate_answer):
    calls = []

    async def call(handle, deadline):
        calls.append(handle)
        answer = stable_answer if handle == "stable" else candidate_answer
        if isinstance(answer, Exception):
            raise answer
        return answer

    r = RolloutRouter("embeddings", canary, "stable", "candidate", OpenAIEmbeddings, Book(), FakeMetrics(),
                      stable_model="s", candidate_model="c")
    r.digests = {"stable": "s", "candidate": "c"}  # both have answered their info()
    return r, call, calls


def test_in_canary_a_request_the_candidate_fails_is_served_by_stable():
    canary = FAST.model_copy(update={"shadow_share": 1e-9})

    async def scenario():
        r, call, calls = router(canary, vectors(0.0), ApiError(ErrorCode.internal_error, "boom"))
        await r.start()
        r.state = {**r.state, "state": CANARY, "weight": 1.0}  # every validator on the candidate
        answer = await r.serve("5Validator", time.monotonic() + 10, call)
        [task.cancel() for task in r._tasks]
        return answer, calls, r.observations

    answer, calls, observations = asyncio.run(scenario())
    assert answer["data"][0]["embedding"][0] == 0.0 and calls == ["candidate", "stable"]
    assert observations[0].candidate_failed is True


def test_shadowing_compares_without_delaying_the_answer():
    async def scenario():
        r, call, calls = router(FAST.model_copy(update={"shadow_share": 1.0}), vectors(0.0), vectors(5.0))
        await r.start()
        answer = await r.serve("5Validator", time.monotonic() + 10, call)
        served_first = list(calls)
        await asyncio.gather(*r.mirrors)
        [task.cancel() for task in r._tasks]
        return answer, served_first, calls, r.observations

    answer, served_first, calls, observations = asyncio.run(scenario())
    assert answer["data"][0]["embedding"][0] == 0.0
    assert served_first == ["stable"] and calls == ["stable", "candidate"]
    assert observations[0].agree is False and observations[0].measure < 0.99


def test_a_candidate_that_has_not_answered_yet_gets_no_request():
    async def scenario():
        r, call, calls = router(FAST.model_copy(update={"shadow_share": 1.0}), vectors(0.0), vectors(0.0))
        r.digests["candidate"] = "-"  # still loading
        await r.start()
        r.state = {**r.state, "state": CANARY, "weight": 1.0}
        await r.serve("5Validator", time.monotonic() + 10, call)
        await asyncio.gather(*r.mirrors)
        [task.cancel() for task in r._tasks]
        return calls, r.observations

    calls, observations = asyncio.run(scenario())
    assert calls == ["stable"] and observations == []


def test_a_restarted_coordinator_keeps_its_decisions(monkeypatch):
    import ray.experimental.internal_kv as kv

    store = {}
    monkeypatch.setattr(kv, "_internal_kv_put", lambda key, value, overwrite, namespace: store.update({key: value}))
    monkeypatch.setattr(kv, "_internal_kv_get", lambda key, namespace: store.get(key))
    book = RolloutBook(store_key="miner-rollouts")
    book.begin("embeddings", FAST.model_dump_json(), "stable", "candidate")
    book.decide("embeddings", "promote", "by the operator")
    again = RolloutBook(store_key="miner-rollouts")  # what Ray's restart of the actor builds
    assert again.begin("embeddings", FAST.model_dump_json(), "stable", "candidate")["state"] == PROMOTED
    assert RolloutBook(store_key="another-miner").states() == {}


def test_the_candidate_leaves_stable_the_time_it_needs():
    async def scenario():
        r, call, calls = router(FAST.model_copy(update={"shadow_share": 1e-9}), vectors(0.0), vectors(0.0))
        await r.start()
        r.state = {**r.state, "state": CANARY, "weight": 1.0}
        r.stable_times.extend([4.0] * 10)  # stable needs 4 s: with 5 s left the candidate is not tried
        await r.serve("5Validator", time.monotonic() + 5, call)
        tried = list(calls)
        await r.serve("5Validator", time.monotonic() + 10, call)  # 10 s: 4 s for the candidate
        [task.cancel() for task in r._tasks]
        return tried, calls

    tried, calls = asyncio.run(scenario())
    assert tried == ["stable"] and calls == ["stable", "candidate"]


def test_a_router_serves_stable_until_the_coordinator_answers():
    class Silent:
        class begin:
            @staticmethod
            async def remote(*args):
                raise TimeoutError("no coordinator")

    async def scenario():
        r, call, calls = router(FAST.model_copy(update={"shadow_share": 1.0}), vectors(0.0), vectors(0.0))
        r.coordinator = Silent()
        await r.start()  # does not raise: the router starts
        await r.serve("5Validator", time.monotonic() + 10, call)
        [task.cancel() for task in r._tasks]
        return r.begun, calls, r.mirrors

    begun, calls, mirrors = asyncio.run(scenario())
    assert not begun and calls == ["stable"] and not mirrors
