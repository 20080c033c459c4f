"""Reliability under overload and faults, against a second app in the session's cluster.

The app (prefix /rel) is sized for the faults: two Embeddings replicas (one can die while
the other serves), two routers, admission as shipped (by deadline), a quick breaker. Load is signed
like a validator's and runs over loopback; each scenario is bounded in time.
"""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import ray
from bittensor.sp_core import Keypair
from ray import serve

from benchmarks.loadgen import Load, percentile, summary
from tests.conftest import MINER, delete_app, deploy_app, ss58, wait_until

APP = "reliability"
PREFIX = "/rel"
PATH = PREFIX + "/v1/embeddings"
ALICE = Keypair.create_from_uri("//Alice")
SMALL = Keypair.create_from_uri("//Small")  # a validator with 1 % of the stake


@pytest.fixture(scope="module")
def rel(miner, tmp_path_factory):
    neurons = [
        {"uid": 0, "hotkey": ss58("//Alice"), "validator_permit": True, "total_stake": 9900.0},
        {"uid": 1, "hotkey": ss58("//Bob"), "validator_permit": False, "total_stake": 0.0},
        {"uid": 2, "hotkey": ss58("//Small"), "validator_permit": True, "total_stake": 100.0},
    ]
    cfg = deploy_app(
        miner, tmp_path_factory, APP, netuid=2, prefix=PREFIX, protocol="openai-embeddings", neurons=neurons,
        # Embeddings only: the faults below are injected there.
        workloads={"diffusion": None, "agents": None, "embeddings": dict(
            placement={"num_replicas": 2, "num_cpus": 0.5}, runtime={"torch_threads": 1}, load={"max_queued_requests": 64},
            degraded={"max_seq_length": 16, "busy_fraction": 0.5, "on_after_s": 1.0, "off_after_s": 2.0})},
        # max_age_s 60: the overload test signs its requests ahead (its client shares the 2 cores).
        subnet=dict(breaker={"consecutive_failures": 3, "open_s": 3.0}, allow_degraded=True, auth={"max_age_s": 60.0},
                    # Small: 1 % of 1000/s = 10/s across both routers, a burst of 1 s.
                    rate_limit={"total_rps": 1000.0, "floor_rps": 1.0, "burst_s": 1.0}))
    yield cfg
    delete_app(APP)


def load(miner, signer=ALICE, timeout_s=5.0):
    texts = ["validators score accuracy, reliability and latency", "stake", "a miner answers inside the deadline"]
    return Load(miner.url, signer, MINER, lambda i: (PATH, {"input": f"{texts[i % 3]} {i}"}), timeout_s=timeout_s,
                headers={"X-Bittensor-Timeout": str(timeout_s)})


def replicas(deployment: str) -> list[dict]:
    """The deployment's live replica actors ({"name", "pid", ...}), read from the GCS
    (the state API needs the dashboard, which the test cluster does not run)."""
    from ray._private.state import actors

    cls = f"ServeReplica:{APP}:{deployment}"
    return [{"name": a["Name"], "pid": a["Pid"]} for a in actors().values()
            if a["ActorClassName"] == cls and a["State"] == "ALIVE"]


def running(deployment: str) -> int:
    status = serve.status().applications[APP].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def ready(miner) -> bool:
    """Every router replica says ready (several answers in a row: they are spread over both)."""
    return all(miner.http.get(PREFIX + "/ready").status_code == 200 for _ in range(6))


def rss_mb(pids) -> float:
    return sum(psutil.Process(pid).memory_info().rss for pid in pids) / 2**20


def test_ready_reports_models_metagraph_and_breakers(miner, rel):
    wait_until(lambda: ready(miner), 30, "/ready")
    body = miner.http.get(PREFIX + "/ready").json()
    assert body["status"] == "ready" and body["reasons"] == []
    assert body["workloads"] == {"embeddings": "answering"}
    assert body["subnets"][0]["breakers"] == {"embeddings": "closed"}
    info = miner.http.get(PREFIX + "/info").json()
    assert info["subnets"][0]["breakers"]["embeddings"]["state"] == "closed"
    assert set(info["admission"]["embeddings"]) == {"in_flight", "max_in_flight", "work_in_flight", "outside_work",
                                                    "in_flight_items", "queued", "queued_work", "drain_rate_items_per_s",
                                                    "estimated_wait_s", "lag_s", "shed", "displaced"}


def test_rate_limit_is_per_hotkey_by_stake_with_retry_after(miner, rel):
    # Signed first, then sent eight at a time: the bucket refills at 10/s, so the 40 must arrive
    # within about a second (sent one by one, a slow CI host took long enough to earn 26).
    requests = [signed(SMALL, {"input": f"t {i}"}) for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        small = list(pool.map(lambda bh: miner.http.post(PATH, content=bh[0], headers=bh[1]), requests))
    codes = [r.status_code for r in small]
    assert codes.count(200) >= 2 and codes.count(429) >= 20, codes
    limited = next(r for r in small if r.status_code == 429)
    assert limited.json()["error"] == "rate_limited" and int(limited.headers["retry-after"]) >= 1
    # Alice, with 99 % of the stake, is not limited at this pace.
    assert all(miner.http.post(PATH, content=b, headers=h).status_code == 200
               for b, h in (signed(ALICE, {"input": f"a {i}"}) for i in range(20)))


def signed(signer, payload, timeout_s=None):
    from serve_app.client import signed_request

    body, headers = signed_request(signer, PATH, payload, MINER)
    if timeout_s is not None:
        headers["X-Bittensor-Timeout"] = str(timeout_s)
    return body, headers


def test_deadline_header_bounds_the_wait(miner, rel):
    body, headers = signed(ALICE, {"input": "x"}, timeout_s="soon")
    resp = miner.http.post(PATH, content=body, headers=headers)
    assert (resp.status_code, resp.json()["error"]) == (422, "invalid_timeout")
    # A deadline too short to meet: a fast 504, and the breaker does not count it against the workload.
    for _ in range(5):
        body, headers = signed(ALICE, {"input": ["a long text to embed " * 40] * 16}, timeout_s=0.001)
        resp = miner.http.post(PATH, content=body, headers=headers)
        assert (resp.status_code, resp.json()["error"]) == (504, "deadline_exceeded"), resp.text
        assert resp.elapsed.total_seconds() < 1
    assert miner.http.get(PREFIX + "/ready").json()["subnets"][0]["breakers"] == {"embeddings": "closed"}


def test_degraded_preset_switches_on_under_sustained_load_and_off_after(miner, rel):
    """With allow_degraded, a saturated model cuts texts to max_seq_length (16 tokens here),
    visible to the caller as prompt_tokens; when the load stops, full texts again."""
    wait_until(lambda: ready(miner), 60, "/ready")
    text = "a validator sends a long text that the degraded preset cuts short " * 6

    def tokens():
        for _ in range(50):
            body, headers = signed(ALICE, {"input": text})
            resp = miner.http.post(PATH, content=body, headers=headers)
            if resp.status_code == 200:
                return resp.json()["usage"]["prompt_tokens"]
            time.sleep(0.05)  # shed under the load: ask again
        raise AssertionError("never answered")

    full = tokens()
    assert full > 16
    seen = []

    def sample():
        end = time.monotonic() + 7
        while time.monotonic() < end:
            seen.append(tokens())
            time.sleep(0.2)

    asyncio.run(load(miner).closed_loop(16, 9.0, during=sample, at_s=1.0))
    assert 16 in seen, f"never degraded under load: {seen}"
    wait_until(lambda: tokens() == full, 30, "the preset switched off after the load")


def test_overload_loses_nothing_and_refuses_fast(miner, rel):
    wait_until(lambda: ready(miner), 30, "/ready")
    # Capacity first: 32 callers, closed loop (deep enough that passes run full, as under overload).
    base = asyncio.run(load(miner).presign(2000).closed_loop(32, 4.0))
    capacity = sum(o.status == 200 for o in base) / 4.0
    assert capacity > 5, summary(base, 4.0)
    pids = [a["pid"] for d in ("Router", "Embeddings") for a in replicas(d)]
    rss_before = rss_mb(pids)
    # 2 x the 32-caller capacity with a 5 s deadline: admission may hold ~4 s of work, and full
    # passes drain faster than 32 callers show, so only part of the excess is refused. (At 3 x in
    # the full suite, with the other apps' replicas on the same 2 cores, the routers' and this
    # client's own CPU became the limit: 305 of 1,206 requests unanswered after 10 s at the client;
    # at 4 x alone likewise: benchmarks/README.md, embeddings overload.)
    seconds, deadline_s = 6.0, 5.0
    overload = load(miner, timeout_s=deadline_s).presign(int(2 * capacity * seconds) + 1)
    outcomes = asyncio.run(overload.open_loop(2 * capacity, seconds))
    stats = summary(outcomes, seconds)
    print("overload", capacity, stats)
    late = sum(o.error == "deadline_exceeded" for o in outcomes)
    assert stats["failed"] == late, stats["by_status"]  # nothing lost: every request has its JSON answer
    # The estimate is measured and the client shares the cores: a few admitted answers may come late (504).
    assert late <= 0.05 * (stats["ok"] + late), stats["by_status"]
    assert {o.status for o in outcomes} <= {200, 408, 429, 503, 504}, stats["by_status"]
    # A known bug, not the rule: with both cores saturated the router reads a tiny body late and its
    # slow-body guard (min_body_bytes_per_s after body_grace_s) takes its own lag for a slow client:
    # a few 408 body_timeout (2 and 9 of ~2,000 in CI; 151 in a 4 x benchmark on the commit before
    # issue 19). A JSON refusal, nothing lost; bounded here until the guard discounts the router's lag.
    assert sum(o.status == 408 for o in outcomes) <= 0.01 * len(outcomes), stats["by_status"]
    # Whether part of the excess is refused depends on how much faster full passes drain than 32
    # callers showed (tests/unit/test_admission.py holds the rule); what is refused is refused
    # before the deadline a wait would have run into (a waiter displaced once it would be late).
    # How fast is a benchmark target (benchmarks/README.md, embeddings overload). These times are
    # the client's, on the same 2 cores: its own queueing comes on top of the miner's (a slower CI
    # host measured refused p99 5.3 s and admitted p99 6.5 s at this 5 s deadline), so the miner's
    # rule shows as most refusals inside the deadline and the tail under the admitted bound.
    if stats["refused"]:
        assert stats["refused_p50_ms"] < deadline_s * 1000, stats
        assert stats["refused_p99_ms"] <= 2 * deadline_s * 1000, stats
    # Admitted answers: inside the deadline at the miner; the client, on the same 2 cores, adds
    # its own queueing. On this host the admitted p99 at 2-4 x is the open target of
    # benchmarks/README.md (embeddings overload), so the bound here is what this host holds.
    assert stats["ok_p99_ms"] <= 2 * deadline_s * 1000, stats
    assert rss_mb(pids) - rss_before < 150, "memory grew under overload"


# Embeddings: in-flight calls on the dead replica are retried on the other (expect none lost).
# Router: calls in flight on it are lost with it (HAProxy cannot resend a signed request).
@pytest.mark.parametrize("deployment, callers", [("Embeddings", 8), ("Router", 4)])
def test_replica_killed_mid_load(miner, rel, deployment, callers):
    wait_until(lambda: ready(miner) and running(deployment) == 2, 60, f"two {deployment} replicas")
    victim = replicas(deployment)[0]

    def kill():
        ray.kill(ray.get_actor(victim["name"], namespace="serve"), no_restart=True)

    # 20 s: the few calls in flight on a dead router are lost whatever the run's length, so the
    # 1 % bound needs enough calls around them (a 12 s run on a slow CI machine made ~590).
    outcomes = asyncio.run(load(miner).closed_loop(callers, 20.0, during=kill, at_s=3.0))
    stats = summary(outcomes, 20.0)
    print(deployment, "killed", stats)
    assert victim["name"] not in {r["name"] for r in replicas(deployment)}, "the replica was not killed"
    assert len(outcomes) > 100
    assert stats["failed"] <= max(1, len(outcomes) // 100), stats["by_status"]
    assert max(o.seconds for o in outcomes) < 5.0 + 1.0, "a request outlived its deadline"
    wait_until(lambda: running(deployment) == 2 and ready(miner), 90, f"Serve replaced the killed {deployment}")
    after = asyncio.run(load(miner).closed_loop(4, 2.0))
    assert all(o.status == 200 for o in after), summary(after, 2.0)


def test_breaker_opens_fails_fast_and_recovers(miner, rel):
    wait_until(lambda: ready(miner) and running("Embeddings") == 2, 60, "two Embeddings replicas")
    victims = replicas("Embeddings")
    ready_reasons = set()

    def kill_all_and_watch_ready():
        for victim in victims:  # no replica left: calls wait for one until their deadline
            ray.kill(ray.get_actor(victim["name"], namespace="serve"), no_restart=True)
        end = time.monotonic() + 8
        while time.monotonic() < end:  # /ready answers from either router; an open breaker shows there
            ready_reasons.update(miner.http.get(PREFIX + "/ready").json()["reasons"])
            time.sleep(0.1)

    outcomes = asyncio.run(load(miner, timeout_s=1.5).closed_loop(8, 25.0, during=kill_all_and_watch_ready, at_s=2.0))
    opened = sorted((o for o in outcomes if o.error == "breaker_open"), key=lambda o: o.sent_at)
    print("breaker", summary(outcomes, 25.0))
    assert opened, summary(outcomes, 25.0)["by_status"]
    # At once: a fraction of the 1.5 s a call waits for a replica (the client shares the 2 cores).
    assert percentile([o.seconds for o in opened], 0.5) < 0.25, "an open breaker must refuse at once"
    # Serve replaces both replicas (model load included); a half-open probe then closes the breakers.
    def answered():
        body, headers = signed(ALICE, {"input": "back?"}, timeout_s=1.5)
        return miner.http.post(PATH, content=body, headers=headers).status_code == 200

    wait_until(answered, 90, "a probe succeeded and the breaker closed")
    assert {o.error for o in outcomes} <= {"", "deadline_exceeded", "unavailable", "breaker_open", "shed"}
    assert any("embeddings breaker open" in r for r in ready_reasons), ready_reasons
    wait_until(lambda: running("Embeddings") == 2 and ready(miner), 90, "Serve replaced both replicas")
