"""Rollouts on the embedded default: what shadowing costs, and how long the miner takes to
promote a good candidate and to roll back a bad one, on the default schedule.

    .venv/bin/python benchmarks/rollout.py [--rate 20] [--quick]

Each miner is `python -m serve_app.rayenv serve run <config>`, what `make run` runs, on a copy
of deployments/local.yaml whose changes are auth.max_age_s 300 (requests signed ahead, as in
benchmarks/embeddings.py), a snapshot with eight permitted validators (stickiness needs more
than one), and, from the second miner on, `workloads.embeddings.canary` with the default
schedule and thresholds, `placement: {num_cpus: 0}` (see CANDIDATE_PLACEMENT) and one of the
candidates of benchmarks/candidates.py:

1. baseline (no canary): c=32 closed loop of single texts, answered/s.
2. identical copy: the same c=32 phase while the rollout shadows (10 % mirrored), then an
   open loop at --rate from all validators until the miner promotes; time to promotion and
   requests served by each side; then c=32 again (the candidate serves everyone).
3. noisy copy (answers disagree): the open loop until the miner rolls back: time, served.
4. failing copy (fails texts with one word; 20 % of the texts have it): the same.
5. baseline again: how far two miner processes drift apart on this machine.
Every phase prints its status counts; throughput counts 200s only. Results:
benchmarks/results/rollout.json.
"""

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from candidates import FAILING_WORD, candidate_model  # noqa: E402
from embeddings import MinerProcess, bench_config, closed_loop_phases, corpus  # noqa: E402
from serve_app.app import load_config  # noqa: E402
from serve_app.client import signed_request, signer_for  # noqa: E402

VALIDATORS = ["//Alice"] + [f"//Validator{i}" for i in range(1, 8)]


# The embedded default reserves 2.0 of this host's 2 logical CPUs: a candidate with the stable's
# share (0.5) would wait for room, or take the room a router replica needs. A share of 0 places
# it beside them; its threads (runtime.torch_threads) are what it runs on.
CANDIDATE_PLACEMENT = {"num_cpus": 0}


def config_with(base: Path, snapshot: Path, canary: dict | None, name: str) -> Path:
    doc = yaml.safe_load(base.read_text())
    args = doc["applications"][0]["args"]
    args["subnets"][0]["metagraph"]["path"] = str(snapshot)
    if canary is not None:
        args["workloads"]["embeddings"]["canary"] = {**canary, "placement": CANDIDATE_PLACEMENT}
    out = ROOT / "benchmarks" / "results" / f"bench-rollout-{name}.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def validators_snapshot(shipped: Path, out: Path) -> Path:
    from bittensor.sp_core import Keypair

    doc = json.loads(shipped.read_text())
    used = {n["uid"] for n in doc["neurons"]}
    for i, uri in enumerate(VALIDATORS[1:]):
        doc["neurons"].append({"uid": max(used) + 1 + i, "hotkey": Keypair.create_from_uri(uri).ss58_address,
                               "validator_permit": True, "total_stake": 1000.0})
    out.write_text(json.dumps(doc))
    return out


def rollout_state(miner) -> dict:
    return miner.info()["workloads"]["embeddings"].get("rollout") or {}


async def open_loop_until(miner, miner_hotkey: str, rate: float, texts: list[str], done, limit_s: float) -> dict:
    """Signed requests at `rate`/s from every validator in turn until `done(state)` or `limit_s`."""
    import aiohttp

    signers = [signer_for(uri) for uri in VALIDATORS]
    statuses: dict[str, int] = {}
    tasks, started, decided_at, state = [], time.monotonic(), None, {}

    async def one(session, i):
        payload = {"input": texts[i % len(texts)]}
        body, headers = signed_request(signers[i % len(signers)], "/v1/embeddings", payload, miner_hotkey)
        try:
            async with session.post(miner.url + "/v1/embeddings", data=body, headers=headers) as resp:
                await resp.read()
                key = str(resp.status)
        except Exception as exc:
            key = type(exc).__name__
        statuses[key] = statuses.get(key, 0) + 1

    async def watch():
        nonlocal decided_at, state
        async with aiohttp.ClientSession() as s:
            while decided_at is None and time.monotonic() - started < limit_s:
                await asyncio.sleep(1.0)
                async with s.get(miner.url + "/info") as resp:
                    state = (await resp.json())["workloads"]["embeddings"].get("rollout") or {}
                if done(state):
                    decided_at = time.monotonic()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        watcher = asyncio.create_task(watch())
        i = 0
        while not watcher.done():
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, i)))
            i += 1
        await asyncio.gather(*tasks)
    return {"decided_after_s": None if decided_at is None else round(decided_at - started, 1),
            "state": state.get("state"), "reason": state.get("reason"), "served": state.get("served"),
            "comparisons": state.get("comparisons"), "traffic_s": state.get("traffic_s"),
            "sent": i, "statuses": dict(sorted(statuses.items()))}


def c32(miner, hotkey, texts, count):
    return closed_loop_phases(miner.url + "/v1/embeddings", None, hotkey, texts, [("c32_single", 32, 1, count)])[
        "c32_single"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "deployments" / "local.yaml"))
    ap.add_argument("--rate", type=float, default=20.0, help="validator requests/s while the rollout decides")
    ap.add_argument("--quick", action="store_true", help="fewer requests in the c=32 phases")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout.json"))
    args = ap.parse_args()
    shipped = Path(args.config)
    base, doc = bench_config(shipped)
    cfg = load_config(shipped)
    hotkey = cfg.wallet.hotkey_ss58()
    port = doc.get("http_options", {}).get("port", 8000)
    count = 480 if args.quick else 960
    texts = corpus(4096)
    work = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    snapshot = validators_snapshot(ROOT / cfg.subnets[0].metagraph.path, work / "metagraph.json")
    record = {"benchmark": "rollout", "config": args.config, "rate": args.rate,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    print("baseline (no canary):", flush=True)
    with MinerProcess(config_with(base, snapshot, None, "baseline"), port) as miner:
        record["baseline_c32"] = c32(miner, hotkey, texts, count)

    print("identical candidate (defaults: shadow 10 %, steps 0.1/0.5/1.0 x weight 0.5, 60 s each):", flush=True)
    same = {"model": candidate_model(work / "same")}
    with MinerProcess(config_with(base, snapshot, same, "same"), port) as miner:
        record["shadow_c32"] = c32(miner, hotkey, texts, count)
        record["shadow_state_after_c32"] = rollout_state(miner).get("state")
        record["promote"] = p = asyncio.run(open_loop_until(miner, hotkey, args.rate, texts,
                                                            lambda s: s.get("state") in ("promoted", "rolled_back"), 600))
        print(f"    promote: {p}", flush=True)
        time.sleep(2)
        record["promoted_c32"] = c32(miner, hotkey, texts, count)

    for name, candidate, mix in (("noisy", {"noise": 0.5}, texts),
                                 ("failing", {"failing_word": FAILING_WORD},
                                  [f"{t} {FAILING_WORD}" if random.Random(i).random() < 0.2 else t
                                   for i, t in enumerate(texts)])):
        print(f"{name} candidate:", flush=True)
        canary = {"model": candidate_model(work / name, **candidate)}
        with MinerProcess(config_with(base, snapshot, canary, name), port) as miner:
            record[f"rollback_{name}"] = r = asyncio.run(open_loop_until(
                miner, hotkey, args.rate, mix, lambda s: s.get("state") in ("promoted", "rolled_back"), 300))
            print(f"    rollback: {r}", flush=True)

    # Side by side in one miner process: shadowing against the same miner once it no longer
    # shadows (promoted: one model serves). Against the baseline miner (another process, without
    # a second model) too, which carries the machine's drift between processes (±20 % here).
    print("baseline again (the drift between miner processes):", flush=True)
    with MinerProcess(config_with(base, snapshot, None, "baseline"), port) as miner:
        record["baseline_again_c32"] = c32(miner, hotkey, texts, count)

    base_rate, shadow_rate = record["baseline_c32"]["answered_per_s"], record["shadow_c32"]["answered_per_s"]
    after_rate = record["promoted_c32"]["answered_per_s"]
    record["shadow_cost"] = round(1 - shadow_rate / after_rate, 3)
    record["shadow_cost_vs_baseline_process"] = round(1 - shadow_rate / base_rate, 3)
    record["targets"] = {
        "shadowing costs <= 10 % of answered/s (same process)": record["shadow_cost"] <= 0.10,
        "promoted within 300 s of traffic": record["promote"]["state"] == "promoted"
        and record["promote"]["decided_after_s"] <= 300,
        "noisy rolled back within 60 s": record["rollback_noisy"]["state"] == "rolled_back"
        and record["rollback_noisy"]["decided_after_s"] <= 60,
        "failing rolled back within 60 s": record["rollback_failing"]["state"] == "rolled_back"
        and record["rollback_failing"]["decided_after_s"] <= 60,
        "every request answered 200": all(set(record[k]["statuses"]) == {"200"}
                                          for k in ("promote", "rollback_noisy", "rollback_failing")),
    }
    print(f"\nc32 answered/s: shadowing {shadow_rate:.1f}, the same miner after promotion {after_rate:.1f} "
          f"(cost {record['shadow_cost']:.1%}); the baseline miner {base_rate:.1f} "
          f"({record['shadow_cost_vs_baseline_process']:.1%})")
    for name, passed in record["targets"].items():
        print(f"  [{'ok' if passed else 'MISS'}] {name}")
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
