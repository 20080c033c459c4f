"""The validator simulator against the session's miner: two validators from a file (//Alice,
admitted; //Poor, stake under the session's min_stake) scored with the real reference model,
and a scripted fault (the Embeddings replica killed, Serve replacing it) in the breakdown."""

import time

import ray
from ray import serve

from serve_app.simulate.driver import prepare, reference_vectors, simulate
from serve_app.simulate.runner import Fault
from serve_app.simulate.scoring import outside, score_run
from tests.conftest import APP, wait_until


def embeddings_replicas() -> list[str]:
    from ray._private.state import actors

    cls = f"ServeReplica:{APP}:Embeddings"
    return [a["Name"] for a in actors().values() if a["ActorClassName"] == cls and a["State"] == "ALIVE"]


def answering(miner, streak=8) -> bool:
    """`streak` signed embeddings in a row answered (no breaker left half-open)."""
    return all(miner.post({"input": "answering?"}).status_code == 200 for _ in range(streak))


def test_simulated_validators_score_the_miner_and_a_fault_shows_in_the_breakdown(miner, tmp_path):
    validators = tmp_path / "validators.yaml"
    validators.write_text("validators:\n"
                          "  - {key: '//Alice', mix: {embeddings: 1}, timeout_s: 4, share: 3}\n"
                          "  - {key: '//Poor', mix: {embeddings: 1}}\n")
    sim = prepare(miner.cfg, miner.cfg.subnets[0], miner.url, validators, seed=1)
    sim.payloads.reference = reference_vectors(miner.cfg, sim.payloads.texts)
    assert [v.name for v in sim.validators] == ["//Alice", "//Poor"] and sim.payloads.reference is not None
    victims = embeddings_replicas()
    assert victims

    def kill():
        ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)

    def recovered():
        wait_until(lambda: serve.status().applications[APP].deployments["Embeddings"]
                   .replica_states.get("RUNNING", 0) >= 1 and set(embeddings_replicas()) - set(victims), 60,
                   "Serve replaced the killed Embeddings replica")

    fault = Fault(at_s=3.0, name="kill-embeddings", start=kill, end=recovered)
    started = time.monotonic()
    try:
        report = simulate(sim, 1, seconds=10.0, rate=8.0, seed=1, faults=[fault])
    finally:
        wait_until(lambda: answering(miner), 90, "the miner answers again after the fault")
    print(f"simulated in {time.monotonic() - started:.1f} s:", report["verdict"]["text"])
    alice, poor = report["validators"]
    assert alice["tasks"] > 30 and poor["tasks"] > 5

    # //Poor is refused by authorisation, all of it: a zero, and the breakdown says why.
    assert poor["score"] == 0.0 and poor["refused"] == poor["tasks"]
    assert poor["breakdown"][0].startswith("100 % refused 403 insufficient_stake at ")
    assert poor["losses"]["403 insufficient_stake"]["category"] == "auth"

    # //Alice: the real model's vectors pass the reference check; what the fault cost is named,
    # inside its window; outside it every task scored.
    window = report["faults"][0]
    assert window["name"] == "kill-embeddings" and window["end"] > window["start"]
    assert alice["wrong"] == 0 and alice["answered"] > 0
    during = [line for line in alice["breakdown"] if "(during kill-embeddings)" in line]
    assert alice["score"] < 1.0 and during, alice["breakdown"]
    alice_only = [a for a in sim.attempts if a.validator == 0]
    calm = score_run(outside(alice_only, report["faults"]), sim.validators[:1], report["run"])
    assert calm["validators"][0]["tasks"] > 10 and calm["validators"][0]["score"] >= 0.99, calm["validators"][0]

    # The verdict weighs by stake (10000 against 50): the fault, not //Poor, limits the miner first.
    first = report["verdict"]["limits"][0]
    assert first["validators"] == ["//Alice"] and first["category"] in ("availability", "capacity"), first
    assert report["ledger_line"]["validators"] == 2 and report["ledger_line"]["first_limit"] == first["cause"]


def test_the_simulator_signs_with_epistula_where_the_subnet_does(miner):
    subnet = next(s for s in miner.cfg.subnets if s.auth.scheme == "epistula")
    sim = prepare(miner.cfg, subnet, miner.url)  # the snapshot's dev-key validators: //Alice
    assert sim.scheme == "epistula" and [v.name for v in sim.validators] == ["//Alice"]
    assert sim.payloads.paths == {"embeddings": subnet.prefix + "/v1/embeddings"}
    report = simulate(sim, subnet.netuid, seconds=3.0, rate=5.0)
    alice = report["validators"][0]
    assert alice["tasks"] > 3 and alice["answered"] == alice["tasks"] and alice["score"] == 1.0, alice
    assert report["verdict"]["holds"]
