"""The validator simulator against the session's miner: two validators from a file (//Alice,
admitted; //Poor, stake under the session's min_stake) scored with the real reference model,
and a scripted fault in the breakdown: the metagraph withdraws //Alice's validator permit for a
while (a caller-side refusal: it does not spend the miner's error budget, which later tests read)."""

import json
import time
from pathlib import Path

from serve_app.simulate.driver import prepare, reference_vectors, simulate
from serve_app.simulate.runner import Fault
from serve_app.simulate.scoring import outside, score_run
from tests.conftest import ss58, wait_until


def answering(miner, streak=8) -> bool:
    """`streak` signed embeddings in a row answered (every router replica has the view back)."""
    return all(miner.post({"input": "answering?"}).status_code == 200 for _ in range(streak))


def set_permit(snapshot: Path, hotkey: str, permit: bool) -> None:
    """Rewrite the snapshot one block later (a view behind the current block is refused)."""
    data = json.loads(snapshot.read_text())
    data["block"] += 1
    for neuron in data["neurons"]:
        if neuron["hotkey"] == hotkey:
            neuron["validator_permit"] = permit
    snapshot.write_text(json.dumps(data))


def test_simulated_validators_score_the_miner_and_a_fault_shows_in_the_breakdown(miner, tmp_path):
    validators = tmp_path / "validators.yaml"
    validators.write_text("validators:\n"
                          "  - {key: '//Alice', mix: {embeddings: 1}, timeout_s: 4, share: 3}\n"
                          "  - {key: '//Poor', mix: {embeddings: 1}}\n")
    sim = prepare(miner.cfg, miner.cfg.subnets[0], miner.url, validators, seed=1)
    sim.payloads.reference = reference_vectors(miner.cfg, sim.payloads.texts)
    assert [v.name for v in sim.validators] == ["//Alice", "//Poor"]
    snapshot, alice = Path(miner.cfg.subnets[0].metagraph.path), ss58("//Alice")

    def withdrawn():  # the routers re-read the snapshot every refresh_s (5 s)
        wait_until(lambda: miner.post({"input": "permit?"}).status_code == 403, 30, "//Alice refused")

    def restored():
        set_permit(snapshot, alice, True)
        wait_until(lambda: answering(miner), 30, "//Alice answered again")

    fault = Fault(at_s=2.0, name="permit-withdrawn", start=lambda: (set_permit(snapshot, alice, False), withdrawn()),
                  end=restored, duration_s=3.0)
    started = time.monotonic()
    try:
        # 20 s: the fault window (up to two 5 s metagraph refreshes and 3 s) leaves enough calm tasks.
        report = simulate(sim, 1, seconds=20.0, rate=8.0, seed=1, faults=[fault])
    finally:
        set_permit(snapshot, alice, True)
        wait_until(lambda: answering(miner), 60, "the miner answers //Alice again")
    print(f"simulated in {time.monotonic() - started:.1f} s:", report["verdict"]["text"])
    alice_r, poor = report["validators"]
    assert alice_r["tasks"] > 40 and poor["tasks"] > 5

    # //Poor is refused by authorisation, all of it: a zero, and the breakdown says why.
    assert poor["score"] == 0.0 and poor["refused"] == poor["tasks"]
    assert poor["breakdown"][0].startswith("100 % refused 403 insufficient_stake at ")
    assert "during" not in poor["breakdown"][0]  # all run long: not the fault's doing
    assert poor["losses"]["403 insufficient_stake"]["category"] == "auth"

    # //Alice: the real model's vectors pass the reference check; the fault's refusals are named,
    # inside its window; outside it every task scored.
    window = report["faults"][0]
    assert window["name"] == "permit-withdrawn" and window["end"] > window["start"]
    assert alice_r["wrong"] == 0 and alice_r["answered"] > 0
    during = [line for line in alice_r["breakdown"] if "refused 403 no_validator_permit" in line]
    assert during and during[0].endswith("(during permit-withdrawn)"), alice_r["breakdown"]
    assert alice_r["losses"]["403 no_validator_permit"]["category"] == "auth"
    alice_only = [a for a in sim.attempts if a.validator == 0]
    calm = score_run(outside(alice_only, report["faults"]), sim.validators[:1], report["run"])
    assert calm["validators"][0]["tasks"] > 20 and calm["validators"][0]["score"] >= 0.99, calm["validators"][0]

    # The verdict weighs by stake (10000 against 50): the fault, not //Poor, limits the miner first.
    first = report["verdict"]["limits"][0]
    assert first["cause"] == "403 no_validator_permit" and first["validators"] == ["//Alice"], first
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
