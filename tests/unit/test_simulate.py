"""The validator simulator without a miner: arrivals (seeded), the checks of answers, scoring,
breakdowns and the verdict on hand-built attempts, the population, and the runner's retries
against a small aiohttp server that stands in for the miner."""

import asyncio
import base64
import json
import random
import socket
import struct
import zlib

import numpy as np
import pytest
from aiohttp import web
from bittensor.sp_core import Keypair

from serve_app.chain.metagraph import SnapshotSource
from serve_app.config import ChainMetagraph, MinerConfig
from serve_app.economics.commands import ledger_json, ledger_text
from serve_app.economics.ledger import Clock, Ledger
from serve_app.simulate.arrivals import BURST, arrival_times, burst_period_s, rate_at
from serve_app.simulate.payloads import Payloads, check_trace, png_size
from serve_app.simulate.population import STYLES, Validator, file_population, population
from serve_app.simulate.runner import Fault, Simulation, judge
from serve_app.simulate.scoring import Attempt, latency_credit, outside, percentile, score_run

SNAPSHOT = {"source": "snapshot", "path": "deployments/local-metagraph.json"}
ROUTES = [{"path": "/v1/embeddings", "protocol": "openai-embeddings"},
          {"path": "/v1/images/generations", "protocol": "openai-images"},
          {"path": "/v1/agents/runs", "protocol": "agent-runs"}]


def config(**subnet):
    return MinerConfig.model_validate({"wallet": {"uri": "//Bob"}, "subnets": [
        {"netuid": 1, "metagraph": SNAPSHOT, "routes": ROUTES, "max_timeout_s": 10, **subnet}],
        "workloads": {"embeddings": {}, "diffusion": {}, "agents": {}}, "router": {"max_in_progress": 2048}})


def validator(name="//Alice", stake=100.0, slo_s=1.0, timeout_s=5.0, retries=0):
    keypair = Keypair.create_from_uri(name)
    return Validator(name=name, signer=keypair, hotkey=keypair.ss58_address, stake=stake, registered=True, share=1.0,
                     mix={"embeddings": 1.0}, timeout_s=timeout_s, slo_s=slo_s, retries=retries)


RUN = {"url": "http://miner", "netuid": 1, "seconds": 60, "rate": 5, "profile": "steady", "started_at": 1000.0}


def answered(v, task, seconds=0.1, kind="embeddings", correct=True, at=1000.0, attempt=0, note=""):
    return Attempt(v, kind, task, attempt, at, seconds, 200, "", correct, note)


def refused(v, task, status=503, error="shed", at=1000.0, attempt=0):
    return Attempt(v, "embeddings", task, attempt, at, 0.01, status, error)


# -- arrivals --------------------------------------------------------------------------------

def test_arrivals_are_seeded_and_poisson_at_the_rate():
    a, b = arrival_times(50, 200, "steady", seed=7), arrival_times(50, 200, "steady", seed=7)
    assert a == b and a != arrival_times(50, 200, "steady", seed=8)
    assert abs(len(a) - 10_000) < 400  # 4 sigma of a Poisson count of mean 10 000
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.05) and gaps.std() == pytest.approx(1 / 50, rel=0.05)
    assert all(0 <= t < 200 for t in a) and a == sorted(a)


def test_bursty_arrivals_come_at_three_times_the_rate_in_bursts_and_keep_the_mean():
    seconds, rate = 600, 20
    times = arrival_times(rate, seconds, "bursty", seed=1)
    period = burst_period_s(seconds)
    in_burst = [t for t in times if t % period >= 0.9 * period]
    assert len(in_burst) / (0.1 * seconds) == pytest.approx(BURST * rate, rel=0.1)
    assert len(times) / seconds == pytest.approx(rate, rel=0.05)
    assert rate_at("bursty", 0.0, seconds, rate) < rate < rate_at("bursty", 0.95 * period, seconds, rate)


def test_diurnal_arrivals_peak_in_the_middle_of_the_compressed_day():
    seconds, rate = 300, 40
    times = arrival_times(rate, seconds, "diurnal", seed=3)
    first = sum(1 for t in times if t < seconds / 10)
    middle = sum(1 for t in times if 0.45 * seconds <= t < 0.55 * seconds)
    assert middle > 2.5 * first  # 1.5 x the rate at noon, about 0.5 x at dawn
    assert len(times) / seconds == pytest.approx(rate, rel=0.05)


def test_an_unknown_profile_and_endless_runs_are_refused():
    with pytest.raises(ValueError, match="unknown profile 'weekly'"):
        rate_at("weekly", 0, 10, 1)
    with pytest.raises(ValueError, match="unknown profile 'weekly'"):
        arrival_times(1, 10, "weekly")
    for rate, seconds in ((float("inf"), 10), (1, float("nan")), (-1, 10)):
        with pytest.raises(ValueError, match="a finite rate and length"):
            arrival_times(rate, seconds)


# -- checks ----------------------------------------------------------------------------------

def png(width, height, fill=0) -> bytes:
    raw = b"".join(b"\x00" + bytes([fill]) * 3 * width for _ in range(height))
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_embeddings_are_checked_against_the_reference_vectors():
    reference = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    payloads = Payloads({"embeddings": "/v1/embeddings"}, texts=[f"t{i}" for i in range(8)], reference=reference)
    work = payloads.make(0, "embeddings", random.Random(1))
    picked = [payloads.texts.index(t) for t in (work.payload["input"] if isinstance(work.payload["input"], list)
                                                  else [work.payload["input"]])]
    good = {"data": [{"index": i, "embedding": (reference[p] * 3).tolist()} for i, p in enumerate(picked)]}
    assert work.check(good)[0]  # the scale does not matter: cosine
    bad = {"data": [{"index": i, "embedding": (-reference[p]).tolist()} for i, p in enumerate(picked)]}
    ok, why = work.check(bad)
    assert not ok and "cosine -1.000 to the reference" in why
    assert work.check({"data": []})[0] is False
    shapes_only = Payloads({"embeddings": "/v1/embeddings"}, texts=["a", "b"])
    w = shapes_only.make(0, "embeddings", random.Random(0))
    n = len(w.payload["input"]) if isinstance(w.payload["input"], list) else 1
    assert w.check({"data": [{"index": i, "embedding": [0.1] * 4} for i in range(n)]})[0]
    w2 = shapes_only.make(0, "embeddings", random.Random(0))
    assert not w2.check({"data": [{"index": i, "embedding": [0.1] * 5} for i in range(n)]})[0]


def test_images_must_be_pngs_of_their_size_and_seeded_repeats_must_match_bytes():
    assert png_size(png(64, 32)) == (64, 32) and png_size(b"GIF89a" + b"\x00" * 30) is None
    payloads = Payloads({"images": "/v1/images/generations"})
    rng = random.Random(0)
    first = payloads.make(0, "images", rng)
    seed = first.payload["seed"]
    answer = lambda data, size="64x64": {"size": size, "data": [{"b64_json": base64.b64encode(data).decode(),  # noqa: E731
                                                                  "seed": seed}]}
    assert first.check(answer(png(64, 64))) == (True, "")
    assert first.check(answer(png(64, 32)))[1] == "a 64x32 PNG, answered as 64x64"
    assert first.check(answer(b"not a png"))[1] == "not a PNG"
    repeats = [w for w in (payloads.make(0, "images", rng) for _ in range(40)) if w.repeat]
    assert repeats and repeats[0].payload["seed"] == seed and repeats[0].payload["prompt"] == first.payload["prompt"]
    assert repeats[0].check(answer(png(64, 64)))[0]  # the same bytes again
    assert repeats[0].check(answer(png(64, 64, fill=9))) == (False, "a seeded re-request returned other bytes")


def test_agent_traces_must_be_well_formed_and_call_only_offered_tools():
    step = {"tool": "calculator", "args": {"expression": "2*3"}, "result": 6, "ms": 1.0}
    assert check_trace({"answer": "6", "finish": "answer", "steps": [step]}, {"calculator"}) == (True, "")
    malformed = {"tool": None, "args": None, "error": "no JSON object found", "ms": 0.0}
    assert check_trace({"answer": None, "finish": "max_steps", "steps": [malformed]}, {"calculator"})[0]
    assert check_trace({"answer": None, "finish": "max_steps", "steps": [step]}, {"retrieve"}) == \
        (False, "step 0 calls 'calculator', not offered")
    assert not check_trace({"answer": None, "finish": "answer", "steps": []}, set())[0]
    both = {**step, "error": "x"}
    assert "exactly one of result and error" in check_trace({"finish": "max_steps", "steps": [both]}, {"calculator"})[1]
    payloads = Payloads({"agents": "/v1/agents/runs"}, tools=("calculator", "scratchpad"))
    work = payloads.make(0, "agents", random.Random(2))
    assert set(work.payload["tools"]) <= {"calculator", "scratchpad"} and work.payload["tools"]


# -- scoring ---------------------------------------------------------------------------------

def test_latency_earns_full_marks_within_the_slo_and_nothing_at_the_deadline():
    assert latency_credit(0.5, 1.0, 5.0) == 1.0
    assert latency_credit(3.0, 1.0, 5.0) == pytest.approx(0.5)
    assert latency_credit(5.0, 1.0, 5.0) == 0.0


def test_refusals_and_wrong_answers_score_zero_and_the_breakdown_names_them():
    vs = [validator("//Alice", stake=900), validator("//Eve", stake=100)]
    attempts = [answered(0, t) for t in range(90)] + [refused(0, 90 + t, at=1000.0 + t) for t in range(10)]
    attempts += [answered(1, t, correct=False, note="cosine 0.100 to the reference, under 0.99") for t in range(5)]
    attempts += [answered(1, 5 + t, seconds=3.0) for t in range(5)]  # half marks: 3 s, SLO 1 s, deadline 5 s
    report = score_run(attempts, vs, RUN)
    alice, eve = report["validators"]
    assert alice["score"] == pytest.approx(0.9) and alice["refused"] == 10 and alice["answered"] == 90
    assert alice["breakdown"][0].startswith("10 % refused 503 shed at ")
    assert eve["score"] == pytest.approx(0.25) and eve["wrong"] == 5
    assert "50 % wrong on embeddings: cosine 0.100" in eve["breakdown"][0]
    assert "p95 3.00 s against a 1 s SLO on embeddings" in eve["breakdown"][1]
    v = report["verdict"]
    assert v["score"] == pytest.approx(0.9 * 0.9 + 0.1 * 0.25) and not v["holds"]
    assert [limit["cause"] for limit in v["limits"]] == ["503 shed", "wrong embeddings", "latency on embeddings"]
    assert v["limits"][0]["category"] == "capacity" and "capacity: 503 shed" in v["text"]
    assert v["top_stake"] == {"name": "//Alice", "score": 0.9}
    assert report["ledger_line"]["first_limit"] == "503 shed" and report["ledger_line"]["tasks"] == 110
    assert report["routes"]["embeddings"]["tasks"] == 110


def test_percentiles_are_nearest_rank():
    assert percentile([1, 2], 0.5) == 1 and percentile(list(range(1, 21)), 0.95) == 19
    assert percentile(list(range(1, 101)), 0.99) == 99 and percentile([7], 0.99) == 7 and percentile([], 0.5) is None


def test_a_retried_task_scores_its_last_attempt_timed_from_its_first_send():
    vs = [validator(retries=1)]  # SLO 1 s, deadline 5 s
    late = [refused(0, 1, status=503, error="shed", at=1000.0), answered(0, 1, attempt=1, at=1004.0, seconds=0.2)]
    r = score_run(late, vs, RUN)["validators"][0]
    assert r["score"] == pytest.approx(0.2) and "latency on embeddings" in r["losses"]  # 4.2 s from its first send
    past = [refused(0, 1, status=503, error="shed", at=1000.0), answered(0, 1, attempt=1, at=1005.0, seconds=0.2)]
    assert score_run(past, vs, RUN)["validators"][0]["score"] == 0.0  # answered past the validator's deadline
    quick = [refused(0, 1, status=503, error="shed", at=1000.0), answered(0, 1, attempt=1, at=1000.5, seconds=0.1)]
    assert score_run(quick, vs, RUN)["validators"][0]["score"] == 1.0
    attempts = [refused(0, 1, status=429, error="rate_limited"), answered(0, 1, attempt=1),
                refused(0, 2, status=429, error="rate_limited"), refused(0, 2, status=429, error="rate_limited", attempt=1)]
    r = score_run(attempts, vs, RUN)["validators"][0]
    assert r["score"] == 0.5 and r["tasks"] == 2 and r["attempts"] == 4 and r["retried"] == 2
    assert "2 tasks retried after a refusal: 1 answered on a retry" in r["breakdown"]
    assert r["losses"]["429 rate_limited"]["category"] == "rate limit"


def test_validators_without_stake_weigh_nothing():
    vs = [validator("//Alice", stake=100), validator("//Ferdie", stake=0)]
    attempts = [answered(0, t) for t in range(10)] + [refused(1, t, 401, "wrong_receiver") for t in range(10)]
    v = score_run(attempts, vs, RUN)["verdict"]
    assert v["holds"] and v["score"] == 1.0 and v["limits"] == [] and "first to give" not in v["text"]
    nobody = [validator("//Alice", stake=0), validator("//Eve", stake=0)]  # no stakes at all: a plain mean
    assert score_run(attempts, nobody, RUN)["verdict"]["score"] == 0.5


def test_refusal_episodes_apart_in_time_are_listed_apart_and_only_a_covering_fault_is_named():
    vs = [validator()]
    fault = {"name": "kill", "start": 1100.0, "end": 1110.0}
    attempts = [refused(0, t, at=1000.0 + t) for t in range(3)] + [refused(0, 10 + t, at=1100.0 + t) for t in range(3)]
    attempts += [refused(0, 20 + t, 403, "insufficient_stake", at=1000.0 + 20 * t) for t in range(10)]
    lines = score_run(attempts, vs, RUN, faults=[fault])["validators"][0]["breakdown"]
    shed = next(line for line in lines if "503 shed" in line)
    assert shed.count("-") == 2 and shed.endswith("(during kill)") and ", " in shed  # two episodes, the second in the fault
    stake = next(line for line in lines if "insufficient_stake" in line)
    assert "during" not in stake  # spread over the run, not the fault's doing
    # A fault whose window covers most of an episode did not cause it if the episode began before it.
    long_fault = {"name": "kill", "start": 1030.0, "end": 1200.0}
    attempts = [refused(0, t, at=1100.0 + t) for t in range(3)]
    attempts += [refused(0, 10 + t, 403, "insufficient_stake", at=1000.0 + 2 * t) for t in range(90)]
    lines = score_run(attempts, vs, RUN, faults=[long_fault])["validators"][0]["breakdown"]
    assert "during" not in next(line for line in lines if "insufficient_stake" in line)
    assert next(line for line in lines if "503 shed" in line).endswith("(during kill)")


def test_an_answer_of_any_shape_is_judged_never_raised_on():
    payloads = Payloads({"embeddings": "/v1/embeddings", "agents": "/v1/agents/runs"}, texts=["a"])
    work = payloads.make(0, "embeddings", random.Random(0))
    for body in (b'{"data": ["x"]}', b'{"data": [{"index": "a"}, {"index": 1}]}', b"[1, 2]", b"not json",
                 b'{"data": [{"index": 0, "embedding": "abc"}]}'):
        correct, note, _ = judge(work, body)
        assert correct is False and note, body
    run = payloads.make(0, "agents", random.Random(0))
    assert judge(run, b'{"finish": "max_steps", "steps": "many"}')[:2] == (False, "no steps list")
    assert judge(run, b'{"finish": "max_steps", "answer": null, "steps": []}') == (True, "", True)


def test_a_holding_miner_and_auth_refusals_with_their_hint():
    vs = [validator("//Alice", stake=10_000), validator("//Ferdie", stake=1)]
    attempts = [answered(0, t) for t in range(50)] + [refused(1, t, 401, "wrong_receiver") for t in range(50)]
    v = score_run(attempts, vs, RUN)["verdict"]
    assert v["holds"] and v["score"] > 0.99
    assert "holds its score at 5 req/s steady" in v["text"] and "auth.require_receiver: false" in v["text"]
    assert score_run([], vs, RUN)["verdict"]["text"] == "no task was sent: nothing to judge"


def test_faults_show_in_the_breakdown_and_windows_can_be_left_out():
    vs = [validator()]
    fault = {"name": "kill-workload", "start": 1010.0, "end": 1020.0}
    attempts = [answered(0, t, at=1000.0 + t) for t in range(10)]
    attempts += [refused(0, 10 + t, 503, "breaker_open", at=1011.0 + t) for t in range(5)]
    r = score_run(attempts, vs, RUN, faults=[fault])["validators"][0]
    assert r["breakdown"][0].endswith("(during kill-workload)") and "refused 503 breaker_open" in r["breakdown"][0]
    kept = outside(attempts, [fault])
    assert len(kept) == 10 and score_run(kept, vs, RUN)["validators"][0]["score"] == 1.0


# -- population ------------------------------------------------------------------------------

def test_the_local_snapshot_gives_its_permitted_dev_validators_by_stake():
    cfg = config()
    found = population(cfg, cfg.subnets[0])
    assert [(v.name, v.stake) for v in found] == [("//Alice", 10000), ("//Eve", 3000), ("//Ferdie", 500)]
    alice, eve, ferdie = found
    assert alice.receiver and not ferdie.receiver and eve.retries == STYLES[1].retries
    assert set(alice.mix) == {"embeddings", "images", "agents"} and sum(alice.mix.values()) == pytest.approx(1)
    assert alice.timeout_s == 10  # its 12 s capped by the subnet's max_timeout_s
    assert alice.slo_s == cfg.subnets[0].slo.latency_s


def test_the_mix_keeps_only_the_subnets_kinds():
    cfg = config(routes=[ROUTES[0]])
    assert all(v.mix == {"embeddings": 1.0} for v in population(cfg, cfg.subnets[0]))


def test_a_validators_file(tmp_path):
    cfg = config()
    path = tmp_path / "validators.yaml"
    path.write_text("validators:\n  - {key: '//Dave', stake: 5, mix: {images: 1}, receiver: false}\n"
                    "  - {key: '//Alice', timeout_s: 2, retries: 2}\n")
    dave, alice = file_population(path, cfg.subnets[0], SnapshotSource(cfg.subnets[0].metagraph, 1).load())
    assert (dave.stake, dave.registered, dave.mix, dave.receiver) == (5, False, {"images": 1.0}, False)
    assert (alice.stake, alice.registered, alice.timeout_s, alice.retries) == (10000, True, 2, 2)
    path.write_text("validators:\n  - {key: '//Alice', wallet: {name: w}}\n")
    with pytest.raises(ValueError, match=r"validators\[0\]: give exactly one of key or wallet"):
        population(cfg, cfg.subnets[0], path)
    path.write_text("validators:\n  - {key: '//Alice', mix: {video: 1}}\n")
    with pytest.raises(ValueError, match="'video'.* are not kinds of work"):
        population(cfg, cfg.subnets[0], path)
    with pytest.raises(ValueError, match="cannot read the validators file"):
        population(cfg, cfg.subnets[0], tmp_path / "none.yaml")
    path.write_text("validators:\n  - {wallet: {hotkey: h}}\n")  # a wallet needs its name
    with pytest.raises(ValueError, match="name"):
        population(cfg, cfg.subnets[0], path)
    only_embeddings = config(routes=[ROUTES[0]])
    path.write_text("validators:\n  - {key: '//Alice', mix: {images: 1}}\n")
    with pytest.raises(ValueError, match=r"the subnet serves none of \['images'\]; it serves \['embeddings'\]"):
        population(only_embeddings, only_embeddings.subnets[0], path)


def test_a_chain_subnet_needs_a_validators_file():
    cfg = config()
    chain = cfg.subnets[0].model_copy(update={"metagraph": ChainMetagraph()})
    with pytest.raises(ValueError, match="reads the chain: the simulator signs only with keys held here"):
        population(cfg, chain)


# -- the runner, against a stand-in miner ------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_runner_signs_sets_the_deadline_and_retries_after_retry_after():
    seen = []

    async def embeddings(request):
        seen.append(dict(request.headers))
        if len(seen) == 1:  # the first is refused with a Retry-After
            return web.json_response({"error": "shed", "detail": "at capacity"}, status=503,
                                     headers={"Retry-After": "0"})
        body = json.loads(await request.read())
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return web.json_response({"data": [{"index": i, "embedding": [1.0, 0.0]} for i in range(len(texts))]})

    async def main(port):
        app = web.Application()
        app.router.add_post("/v1/embeddings", embeddings)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        sim = Simulation(f"http://127.0.0.1:{port}", Keypair.create_from_uri("//Bob").ss58_address, "btauth",
                         [validator(retries=1, timeout_s=4.0)], Payloads({"embeddings": "/v1/embeddings"}))
        marks = []
        fault = Fault(at_s=0.0, name="mark", start=lambda: marks.append("start"), end=lambda: marks.append("end"),
                      duration_s=0.1)
        try:
            return await sim.run([0.0], [fault]), sim.windows, marks
        finally:
            await runner.cleanup()

    attempts, windows, marks = asyncio.run(main(free_port()))
    assert [(a.task, a.attempt, a.status, a.error) for a in attempts] == [(1, 0, 503, "shed"), (1, 1, 200, "")]
    assert attempts[1].correct
    miner = Keypair.create_from_uri("//Bob").ss58_address
    assert all(h["X-Bittensor-Timeout"] == "4" and h["X-Bittensor-Receiver"] == miner for h in seen)
    assert seen[0]["X-Bittensor-Nonce"] != seen[1]["X-Bittensor-Nonce"]  # each try signed afresh
    assert marks == ["start", "end"] and windows[0]["name"] == "mark" and windows[0]["end"] >= windows[0]["start"]


# -- the ledger line ---------------------------------------------------------------------------

def test_a_simulation_line_is_recorded_in_the_ledger_and_listed(tmp_path):
    cfg = MinerConfig.model_validate({"wallet": {"uri": "//Bob"}, "subnets": [{"netuid": 1, "metagraph": SNAPSHOT}],
                                      "ledger": {"path": str(tmp_path / "l.sqlite")}})
    vs = [validator()]
    line = score_run([answered(0, 1)], vs, RUN)["ledger_line"]
    ledger = Ledger(cfg.ledger.path, Clock.of(cfg.ledger))
    ledger.add_simulation(line)
    ledger.close()
    reader = Ledger(cfg.ledger.path, Clock.of(cfg.ledger), readonly=True)
    data = ledger_json(cfg, reader, None)
    assert data["subnets"]["1"]["simulations"] == [line]
    assert "1 validators, 5 req/s steady for 60 s, score 1.000, holds" in ledger_text(data, None)
