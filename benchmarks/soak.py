"""Compressed soak: the validator simulator at ~70 % of measured capacity for a long run, with
faults on a schedule, reported per slice.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--slice-minutes 5] [--load 0.7]

Starts its own Ray cluster and the embedded default (deployments/local.yaml under
deployments/ray.env, as `make run` starts it; its snapshot copied to a temporary file the
metagraph fault can break, its ledger in a temporary file), on port 8141. Then:
  capacity  the simulator's population (the snapshot's //Alice, //Eve, //Ferdie, as
            `torchrank-miner simulate` sends) at rising rates, 20 s each, until the top-stake
            validator scores under 0.99: capacity is the last rate it held
  soak      Poisson at --load x capacity for --minutes, with, at fractions of the run:
              20 %  kill-embeddings   one Embeddings replica killed (ray.kill); Serve replaces it
              40 %  replay-restart    the shared replay store killed, Ray restarts it empty; a
                                      request answered before must still be refused after
              55 %  metagraph-down    the snapshot file unreadable for run/15 (at most 2 min)
              75 %  burst-3x          arrivals at 3 x the soak rate for run/30 (at most 60 s)
            every 10 s: the RSS of every miner process (Ray's and HAProxy's) and the miner
            port's open connections
Reported per slice: answered, refused, lost (no answer inside the validator's deadline, a 500,
or a 5xx that is not the miner's JSON; a fast refusal, 503 unavailable and 504 are answers), p95/p99, the top-stake validator's score, memory, connections;
per fault: its window, its recovery, what it cost; and the targets: no admitted request lost,
RSS growth under 5 % after the first slice (warm-up), every fault recovered without a hand,
the top-stake validator at 0.99 or more outside the fault windows. JSON to --out, a plot to
--plot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serve_app import rayenv  # noqa: E402
from serve_app.app import build_app, load_config, with_absolute_paths  # noqa: E402
from serve_app.errors import REFUSALS  # noqa: E402
from serve_app.simulate.arrivals import arrival_times  # noqa: E402
from serve_app.simulate.driver import prepare, reference_vectors, simulate  # noqa: E402
from serve_app.simulate.runner import Fault  # noqa: E402
from serve_app.client import error_code  # noqa: E402
from serve_app.simulate.scoring import outside, percentile, score_run, tasks_of  # noqa: E402

APP = "miner"
PORT = 8141
SAMPLE_S = 10.0


def miner_config(snapshot: Path, ledger: Path):
    cfg = with_absolute_paths(load_config(ROOT / "deployments/local.yaml"), ROOT)
    subnet = cfg.subnets[0]
    subnet = subnet.model_copy(update={"metagraph": subnet.metagraph.model_copy(update={"path": str(snapshot)})})
    return cfg.model_copy(update={"subnets": (subnet,), "ledger": cfg.ledger.model_copy(update={"path": str(ledger)})})


# The miner's honest "could not" (JSON, with its code): a fast refusal, a restarting dependency,
# a deadline it could not make. Anything else without a 200 is work lost.
ANSWERED_NO = REFUSALS | {"unavailable", "deadline_exceeded"}


def lost(a) -> bool:
    """Sent and never given an answer: no HTTP answer inside the validator's deadline (a dropped
    connection, a hang), a 500, or a 5xx that is not the miner's JSON."""
    return a.status == 0 or (a.status >= 500 and a.error not in ANSWERED_NO)


class Sampler(threading.Thread):
    """Every SAMPLE_S: RSS per miner process (by its name) and the port's open connections. The
    miner's processes are this one's descendants: ray.init started the GCS and the raylet, the
    raylet the workers and replicas, the proxy actor HAProxy."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.sample())
            self.stop.wait(SAMPLE_S)

    def sample(self) -> dict:
        import psutil

        rss: dict[str, int] = {}
        for p in psutil.Process(os.getpid()).children(recursive=True):
            try:
                cmd = p.cmdline()
                # A worker's title carries the method it runs ("ray::ServeReplica:app:X.handle_..."):
                # the actor's name without it.
                name = cmd[0].split(".")[0] if cmd and cmd[0].startswith("ray::") else p.name()
                rss[name] = rss.get(name, 0) + p.memory_info().rss
            except psutil.Error:  # gone since the listing
                continue
        try:
            conns = sum(1 for c in psutil.net_connections("tcp")
                        if c.laddr and c.laddr.port == self.port and c.status == psutil.CONN_ESTABLISHED)
        except psutil.Error:
            conns = None
        return {"t": time.time(), "rss_mb": {k: round(v / 2**20, 1) for k, v in sorted(rss.items())},
                "rss_total_mb": round(sum(rss.values()) / 2**20, 1), "connections": conns}


class Faults:
    """The scheduled faults and the checks that they recovered by themselves."""

    def __init__(self, miner, cfg, snapshot: Path):
        self.miner = miner
        self.cfg = cfg
        self.snapshot = snapshot
        self.good = snapshot.read_bytes()
        self.notes: dict[str, dict] = {}
        self.victims: list[str] = []
        self.replay: tuple = ()

    def kill_embeddings(self) -> None:
        from reliability import kill, replica_actors

        self.victims = replica_actors("Embeddings")[:1]
        kill(self.victims)

    def embeddings_back(self) -> None:
        started = time.monotonic()
        try:
            self.miner.wait_healthy({"Router": 1, "Embeddings": 1}, gone=tuple(self.victims), timeout_s=300)
            self.miner.wait_answering(timeout_s=300)
            recovered = True
        except RuntimeError:  # not within 5 minutes: a hand would be needed
            recovered = False
        self.notes["kill-embeddings"] = {"recovered": recovered, "recover_s": round(time.monotonic() - started, 1)}

    def restart_replay_store(self) -> None:
        import ray

        from serve_app.client import signed_request

        for _ in range(20):  # a request answered first (under load one may be refused)
            body, headers = signed_request(self.miner.signer, "/v1/embeddings", {"input": "sent once"},
                                           self.miner.hotkey)
            first = self.miner.http.post("/v1/embeddings", content=body, headers=headers).status_code
            if first == 200:
                break
            time.sleep(0.25)
        self.replay = (body, headers, first)
        ray.kill(ray.get_actor(f"{self.cfg.name}-nonces", namespace="torchrank"), no_restart=False)

    def replay_refused(self) -> None:
        """Once fresh requests are answered again (the store is back, empty), the bytes answered
        before the restart must still be refused, never answered twice: 503 unavailable (a new
        store refuses what was signed before it started, serve_app/router/auth.py), or 401 once
        past auth.max_age_s."""
        started = time.monotonic()
        body, headers, first = self.replay
        try:
            self.miner.wait_answering(timeout_s=300)
            recovered = True
        except RuntimeError:
            recovered = False
        again = self.miner.http.post("/v1/embeddings", content=body, headers=headers)
        self.notes["replay-restart"] = {
            "recovered": recovered, "recover_s": round(time.monotonic() - started, 1), "first": first,
            "replayed_after_restart": f"{again.status_code} {error_code(again.status_code, again.content)}",
            "replay_refused": first == 200 and again.status_code != 200}

    def break_metagraph(self) -> None:
        self.snapshot.write_text("{not a metagraph")

    def restore_metagraph(self) -> None:
        self.snapshot.write_bytes(self.good)
        started = time.monotonic()
        ready = False
        while time.monotonic() - started < 60 and not ready:
            ready = self.miner.http.get("/ready").status_code == 200
            time.sleep(0.5)
        self.notes["metagraph-down"] = {"recovered": ready, "recover_s": round(time.monotonic() - started, 1)}

    def burst_over(self) -> None:
        started = time.monotonic()
        try:
            self.miner.wait_answering(timeout_s=300)
            recovered = True
        except RuntimeError:
            recovered = False
        self.notes["burst-3x"] = {"recovered": recovered, "recover_s": round(time.monotonic() - started, 1)}


def capacity(sim_factory, seconds: float) -> tuple[float, list[dict]]:
    """The highest rate (requests/s, all validators) at which the top-stake validator held 0.99."""
    steps, held, rate = [], 0.0, 10.0
    while rate <= 400:
        sim = sim_factory()
        report = simulate(sim, 1, seconds, rate, seed=int(rate))
        top = report["verdict"]["top_stake"]["score"]
        steps.append({"rate": rate, "top_stake_score": top, "answered_per_s": round(report["ledger_line"]["answered"] /
                                                                                 seconds, 1),
                      "statuses": statuses(sim.attempts)})
        print(f"capacity step {rate:g} req/s: top-stake score {top}, {steps[-1]['statuses']}", flush=True)
        if top is None or top < 0.99:
            break
        held = rate
        rate = round(rate * 1.5, 1)
        time.sleep(5)  # let admission's measured drain rate settle between steps
    return held, steps


def statuses(attempts) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in attempts:
        key = "200" if a.status == 200 else (f"{a.status} {a.error}" if a.status else f"no answer {a.error}")
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def slices(report: dict, attempts, samples: list[dict], t0: float, seconds: float, slice_s: float, validators) -> list[dict]:
    """Per slice: the tasks first sent in it, all their attempts (a retry may land in the next)."""
    out = []
    top = max(range(len(validators)), key=lambda i: validators[i].stake)
    started = {key: a.sent_at for key, a in tasks_of(attempts).items()}
    for k in range(int(-(-seconds // slice_s))):
        lo, hi = t0 + k * slice_s, t0 + min(seconds, (k + 1) * slice_s)
        mine = [a for a in attempts if lo <= started[(a.validator, a.task)] < hi]
        ok = [a.seconds for a in mine if a.status == 200]
        top_only = [a for a in mine if a.validator == top]
        score = score_run(top_only, validators, report["run"])["validators"][top]["score"] if top_only else None
        inside = [s for s in samples if lo <= s["t"] < hi + SAMPLE_S]
        faults = [f["name"] for f in report["faults"] if f["start"] < hi and lo <= f["end"]]
        out.append({"slice": k + 1, "from_s": round(lo - t0), "to_s": round(hi - t0), "attempts": len(mine),
                    "answered": len(ok), "refused": sum(1 for a in mine if a.status and a.status != 200 and not lost(a)),
                    "lost": sum(1 for a in mine if lost(a)),
                    "p95_ms": ms(percentile(ok, 0.95)), "p99_ms": ms(percentile(ok, 0.99)),
                    "top_stake_score": score,
                    "rss_total_mb": inside[-1]["rss_total_mb"] if inside else None,
                    "rss_by_process_mb": inside[-1]["rss_mb"] if inside else None,
                    "connections_max": max((s["connections"] for s in inside if s["connections"] is not None),
                                           default=None),
                    "faults": faults, "statuses": statuses(mine)})
    return out


def ms(seconds):
    return None if seconds is None else round(seconds * 1000, 1)


def fault_costs(report: dict, attempts) -> list[dict]:
    calm = outside(attempts, report["faults"])
    base_bad = sum(1 for a in calm if a.status != 200) / max(1, len(calm))
    out = []
    for f in report["faults"]:
        inside = [a for a in attempts if f["start"] <= a.sent_at + a.seconds and a.sent_at <= f["end"]]
        bad = sum(1 for a in inside if a.status != 200)
        out.append({"fault": f["name"], "window_s": round(f["end"] - f["start"], 1), "attempts": len(inside),
                    "answered": len(inside) - bad, "not_answered": bad,
                    "beyond_baseline": round(bad - base_bad * len(inside), 1),
                    "lost": sum(1 for a in inside if lost(a)), "statuses": statuses(inside)})
    return out


def plot(path: Path, attempts, samples, report, t0: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bin_s = 30.0
    bins = int(report["run"]["seconds"] // bin_s)
    answered, refused, auth, p95 = [0] * bins, [0] * bins, [0] * bins, [[] for _ in range(bins)]
    for a in attempts:
        b = int((a.sent_at - t0) // bin_s)
        if not 0 <= b < bins:
            continue  # a retry after the run's end
        if a.status == 200:
            answered[b] += 1
            p95[b].append(a.seconds)
        elif 400 <= a.status < 500 and a.status != 429:
            auth[b] += 1
        else:
            refused[b] += 1
    xs = [(i + 0.5) * bin_s / 60 for i in range(bins)]
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    axes[0].plot(xs, [n / bin_s for n in answered], label="answered/s")
    axes[0].plot(xs, [n / bin_s for n in refused], label="refused for load or a fault, or lost /s")
    axes[0].plot(xs, [n / bin_s for n in auth], label="refused by auth /s (//Ferdie: no receiver)", linestyle=":")
    axes[0].set_ylabel("requests/s")
    axes[0].legend(loc="upper left")
    axes[1].plot(xs, [1000 * (percentile(v, 0.95) or 0) for v in p95], color="tab:purple")
    axes[1].set_ylabel("answered p95 ms")
    axes[2].plot([(s["t"] - t0) / 60 for s in samples], [s["rss_total_mb"] for s in samples], color="tab:green")
    axes[2].set_ylabel("miner RSS MiB")
    axes[2].set_xlabel("minutes")
    for ax in axes:
        for f in report["faults"]:
            ax.axvspan((f["start"] - t0) / 60, (f["end"] - t0) / 60, color="tab:red", alpha=0.15)
    for f in report["faults"]:
        axes[0].annotate(f["name"], ((f["start"] - t0) / 60, axes[0].get_ylim()[1] * 0.9), fontsize=8)
    fig.suptitle("soak: the embedded default under simulated validators (faults shaded)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--slice-minutes", type=float, default=5.0)
    parser.add_argument("--load", type=float, default=0.7, help="share of the measured capacity")
    parser.add_argument("--capacity", type=float, help="skip the measurement: this rate is the capacity")
    parser.add_argument("--step-s", type=float, default=20.0, help="seconds per capacity step")
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/soak.json"))
    parser.add_argument("--plot", default=str(ROOT / "benchmarks/results/soak.png"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    snapshot = work / "metagraph.json"
    shutil.copy(ROOT / "deployments/local-metagraph.json", snapshot)
    cfg = miner_config(snapshot, work / "ledger.sqlite")

    rayenv.apply()
    import ray
    from ray import serve

    from reliability import Miner

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    miner = Miner(args.port)
    miner.wait_healthy({"Router": 1, "Embeddings": 1})
    miner.wait_answering()
    url = f"http://127.0.0.1:{args.port}"
    first = prepare(cfg, cfg.subnets[0], url)
    reference = reference_vectors(cfg, first.payloads.texts)  # loaded once, shared by every run

    def fresh(seed=0):
        sim = prepare(cfg, cfg.subnets[0], url, seed=seed)
        sim.payloads.reference = reference
        return sim

    sampler = Sampler(args.port)
    results: dict = {"config": "deployments/local.yaml (snapshot copied, ledger in a temporary file)",
                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        if args.capacity:
            cap, steps = args.capacity, []
        else:
            cap, steps = capacity(fresh, args.step_s)
        results["capacity"] = {"rate": cap, "steps": steps}
        rate = round(args.load * cap, 1)
        seconds = args.minutes * 60
        burst_s, metagraph_s = min(60.0, seconds / 30), min(120.0, seconds / 15)
        burst_at = 0.75 * seconds
        times = sorted(arrival_times(rate, seconds, "steady", seed=11)
                       + [burst_at + t for t in arrival_times(2 * rate, burst_s, "steady", seed=12)])
        faults = Faults(miner, cfg, snapshot)
        schedule = [Fault(0.20 * seconds, "kill-embeddings", faults.kill_embeddings, faults.embeddings_back),
                    Fault(0.40 * seconds, "replay-restart", faults.restart_replay_store, faults.replay_refused),
                    Fault(0.55 * seconds, "metagraph-down", faults.break_metagraph, faults.restore_metagraph,
                          duration_s=metagraph_s),
                    Fault(burst_at, "burst-3x", lambda: None, faults.burst_over, duration_s=burst_s)]
        sim = fresh(seed=11)
        print(f"soak: {rate} req/s ({args.load:g} x {cap:g}) for {args.minutes:g} min, {len(times)} arrivals", flush=True)
        sampler.start()
        t0 = time.time()
        report = simulate(sim, 1, seconds, rate, seed=11, faults=schedule, arrivals=times)
        sampler.stop.set()
        sampler.join()
        attempts = sim.attempts
        calm = score_run(outside(attempts, report["faults"]), sim.validators, report["run"])
        top = max(calm["validators"], key=lambda r: r["stake"])
        warm = slices(report, attempts, sampler.samples, t0, seconds, args.slice_minutes * 60, sim.validators)
        # After warm-up: the last reading of the first slice taken before the first fault.
        first_fault = min(f["start"] for f in report["faults"]) if report["faults"] else float("inf")
        warm_end = min(t0 + args.slice_minutes * 60, first_fault)
        first_rss = max((s for s in sampler.samples if s["t"] < warm_end), key=lambda s: s["t"],
                        default=sampler.samples[0])["rss_total_mb"]
        last_rss = sampler.samples[-1]["rss_total_mb"]
        growth = (last_rss - first_rss) / first_rss if first_rss else None
        lost_all = sum(1 for a in attempts if lost(a))
        lost_calm = sum(1 for a in outside(attempts, report["faults"]) if lost(a))
        results.update({
            "soak": {"rate": rate, "seconds": seconds, "arrivals": len(times), "attempts": len(attempts),
                     "statuses": statuses(attempts), "verdict": report["verdict"]["text"]},
            "validators": [{k: r[k] for k in ("name", "stake", "score", "tasks", "answered", "refused", "failed",
                                               "wrong", "p95_ms", "breakdown")} for r in report["validators"]],
            "slices": warm, "faults": fault_costs(report, attempts), "fault_notes": faults.notes,
            "samples": sampler.samples,
            "rss_mb": {"after_warmup": first_rss, "end": last_rss,
                       "growth": None if growth is None else round(growth, 4),
                       "by_process_end": sampler.samples[-1]["rss_mb"]},
            "targets": {
                "no_admitted_request_lost": {"lost": lost_all, "lost_outside_faults": lost_calm, "met": lost_all == 0},
                "rss_growth_under_5pct": {"growth": None if growth is None else round(growth, 4),
                                          "met": growth is not None and growth < 0.05},
                "faults_recovered_by_themselves": {
                    "met": len(faults.notes) == len(schedule) and all(n["recovered"] for n in faults.notes.values())
                    and faults.notes.get("replay-restart", {}).get("replay_refused", False)},
                "top_stake_outside_faults": {"name": top["name"], "score": top["score"],
                                             "met": top["score"] is not None and top["score"] >= 0.99}},
        })
        plot(Path(args.plot), attempts, sampler.samples, report, t0)
    finally:
        sampler.stop.set()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'slice':>5} {'min':>9} {'attempts':>8} {'answered':>8} {'refused':>7} {'lost':>5} {'p95 ms':>8} "
          f"{'p99 ms':>8} {'top score':>9} {'RSS MiB':>8} {'conns':>5}  faults")
    for s in results["slices"]:
        print(f"{s['slice']:>5} {s['from_s'] / 60:>4.0f}-{s['to_s'] / 60:<4.0f} {s['attempts']:>8} {s['answered']:>8} "
              f"{s['refused']:>7} {s['lost']:>5} {str(s['p95_ms']):>8} {str(s['p99_ms']):>8} "
              f"{str(s['top_stake_score']):>9} {str(s['rss_total_mb']):>8} {str(s['connections_max']):>5}  "
              f"{', '.join(s['faults'])}")
    for f in results["faults"]:
        note = results["fault_notes"].get(f["fault"], {})
        print(f"fault {f['fault']}: window {f['window_s']} s, {f['attempts']} attempts, {f['not_answered']} not "
              f"answered ({f['beyond_baseline']} beyond the baseline), {f['lost']} lost; {json.dumps(note)}; "
              f"{json.dumps(f['statuses'])}")
    print("validators", json.dumps([(v["name"], v["score"], v["tasks"]) for v in results["validators"]]))
    print("targets", json.dumps(results["targets"]))
    print("statuses", json.dumps(results["soak"]["statuses"]))
    print("verdict", results["soak"]["verdict"])


if __name__ == "__main__":
    main()
