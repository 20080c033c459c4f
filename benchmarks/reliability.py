"""Reliability run: load held, faults injected, requests lost, admitted p99, time to recover.

    .venv/bin/python benchmarks/reliability.py [--seconds 12]

Starts its own Ray cluster and the embedded default sized for faults (2 Router and 2
Embeddings replicas, admission as shipped: by deadline, at most 2 s of queued texts), then runs, each
from a healthy miner:
  baseline      16 closed-loop callers: the capacity the other scenarios are scaled to
  overload      open loop at 4 x capacity
  kill-workload 8 callers; one Embeddings replica is killed (ray.kill) a quarter in
  kill-router   4 callers; one Router replica is killed a quarter in
  slow-bodies   4 callers while 150 unauthenticated connections each declare a 4 KiB body
                and send one byte of it every 0.5 s (reconnecting when cut)
  replay-restart one signed request answered; the shared replay store killed (Ray restarts
                it empty); the same bytes sent again 3 s later must be refused
  breaker       8 callers with a 1.5 s deadline; both Embeddings replicas killed (last: the
                outage leaves the measured drain rate low for a while)
"Lost" is an admitted request that got no answer or a 5xx other than a fast refusal
(503 shed / breaker_open, 429); "recover" is the time from the fault until Serve runs
the full replica count again and every router answers /ready.

    .venv/bin/python benchmarks/reliability.py --against http://127.0.0.1:8000 [--seconds 10]

runs, instead, the edge's scenarios against a miner already running (`make run`: the shipped
config as users run it, started fresh so that no address is trusted yet), each phase printing
its status counts and the CPU each process spent:
  floods        a signed validator (//Alice, closed loop of 4, from 127.0.0.2) alone, then beside
                h2load floods from 127.0.0.1, one new connection per request: 5,000 req/s without
                auth headers; 5,000 req/s claiming //Dave (not registered); 1,000 req/s of wrong
                signatures claiming //Alice. Kept: answered share, answered/s against the
                unflooded run, p99, and HAProxy's CPU per refused request.
  overload      capacity (closed loop of 32, single texts), then an open loop at 4 x
                it with X-Bittensor-Timeout 5: answered/s against capacity, refusals p50, every
                request answered (a 200 or a JSON refusal) within deadline + 1 s, no 500, and
                the router's CPU per answered request.
The validator and the overload are a Python client (aiohttp): its own CPU is in the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serve_app import rayenv  # noqa: E402
from serve_app.app import build_app, load_config  # noqa: E402
from serve_app.client import signer_for  # noqa: E402
from loadgen import Load, summary  # noqa: E402
import proc_cpu  # noqa: E402

APP = "miner"
PATH = "/v1/embeddings"


def config():
    args = load_config(ROOT / "deployments/local.yaml").model_dump()
    args["subnets"][0]["metagraph"]["path"] = str(ROOT / "deployments/local-metagraph.json")
    args["subnets"][0]["breaker"] = {"consecutive_failures": 3, "open_s": 3.0}
    args["router"].update(num_replicas=2, num_cpus=0.25)
    embeddings = args["workloads"]["embeddings"]
    embeddings["placement"].update(num_replicas=2, num_cpus=0.5)
    embeddings["runtime"]["torch_threads"] = 1
    embeddings["load"]["max_queued_requests"] = 64
    return type(load_config(ROOT / "deployments/local.yaml")).model_validate(args)


class Miner:
    def __init__(self, port: int):
        import httpx

        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=10)
        self.signer = signer_for("//Alice")
        self.hotkey = signer_for("//Bob").ss58_address

    def load(self, timeout_s=5.0) -> Load:
        return Load(self.url, self.signer, self.hotkey, lambda i: (PATH, {"input": f"a validator's text number {i}"}),
                    timeout_s=timeout_s, headers={"X-Bittensor-Timeout": str(timeout_s)})

    def healthy(self, replicas: dict[str, int], gone: tuple[str, ...] = ()) -> bool:
        """Full replica count RUNNING (none of the killed ones among them) and every router ready."""
        from ray import serve

        try:
            deployments = serve.status().applications[APP].deployments
            if any(deployments[d].replica_states.get("RUNNING", 0) < n for d, n in replicas.items()):
                return False
            alive = {d: replica_actors(d) for d in replicas}
            if any(len(alive[d]) < n for d, n in replicas.items()) or set(gone) & {a for v in alive.values() for a in v}:
                return False
            return all(self.http.get("/ready").status_code == 200 for _ in range(6))
        except Exception:
            return False

    def wait_healthy(self, replicas, gone: tuple[str, ...] = (), timeout_s=120.0) -> float:
        start = time.monotonic()
        while not self.healthy(replicas, gone):
            if time.monotonic() - start > timeout_s:
                raise RuntimeError("the miner did not recover")
            time.sleep(0.25)
        return time.monotonic() - start

    def wait_answering(self, timeout_s=120.0) -> None:
        """Eight signed requests in a row answered: no breaker left half-open by an earlier scenario
        (/ready is 200 then, while all but its probe are refused)."""
        from serve_app.client import signed_request

        start, streak = time.monotonic(), 0
        while streak < 8:
            if time.monotonic() - start > timeout_s:
                raise RuntimeError("the miner does not answer")
            body, headers = signed_request(self.signer, PATH, {"input": "answering?"}, self.hotkey)
            streak = streak + 1 if self.http.post(PATH, content=body, headers=headers).status_code == 200 else 0
            time.sleep(0.1)


def replica_actors(deployment: str) -> list[str]:
    from ray._private.state import actors

    cls = f"ServeReplica:{APP}:{deployment}"
    return [a["Name"] for a in actors().values() if a["ActorClassName"] == cls and a["State"] == "ALIVE"]


def kill(names: list[str]) -> None:
    import ray

    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def fault_run(miner: Miner, replicas, concurrency, seconds, deployment, how_many=1, timeout_s=5.0) -> dict:
    """Load with one fault a quarter in; recovery timed from the fault, in a thread beside the load."""
    victims = replica_actors(deployment)[:how_many]
    recovery: dict = {}
    load = miner.load(timeout_s)

    def fault():
        recovery["at_s"] = time.perf_counter()
        kill(victims)
        recovery["killed_at"] = time.monotonic()

        def watch():
            miner.wait_healthy(replicas, gone=tuple(victims))
            recovery["recover_s"] = time.monotonic() - recovery["killed_at"]

        threading.Thread(target=watch, daemon=True).start()

    outcomes = asyncio.run(load.closed_loop(concurrency, seconds, during=fault, at_s=seconds / 4))
    while "recover_s" not in recovery:
        time.sleep(0.25)
    stats = summary(outcomes, seconds)
    stats.update(fault=f"ray.kill {how_many} {deployment}", recover_s=round(recovery["recover_s"], 1))
    return stats, outcomes, seconds / 4


async def slow_body_flood(port: int, connections: int, stop: asyncio.Event) -> dict:
    """`connections` clients that declare a 4 KiB body and trickle it, one byte per 0.5 s;
    each reconnects when the miner cuts it. Returns how they were answered."""
    answers: dict[str, int] = {}
    head = (f"POST {PATH} HTTP/1.1\r\nHost: miner\r\nContent-Type: application/json\r\n"
            f"Content-Length: 4096\r\n\r\n").encode()

    async def one() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                answers["connect failed"] = answers.get("connect failed", 0) + 1
                await asyncio.sleep(0.5)
                continue
            writer.write(head)
            status = "cut"
            try:
                while not stop.is_set():
                    writer.write(b"x")
                    await writer.drain()
                    try:
                        reply = await asyncio.wait_for(reader.read(64), 0.5)
                    except asyncio.TimeoutError:
                        continue
                    status = reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/") else "closed"
                    break
            except OSError:
                pass
            finally:
                writer.close()
            answers[status] = answers.get(status, 0) + 1

    await asyncio.gather(*(one() for _ in range(connections)))
    return answers


def flood_run(miner: Miner, port: int, concurrency: int, seconds: float, connections: int = 150) -> dict:
    """The validator's closed loop while slow bodies flood the port (they start 1 s ahead)."""

    async def run():
        stop = asyncio.Event()
        flood = asyncio.create_task(slow_body_flood(port, connections, stop))
        await asyncio.sleep(1.0)
        outcomes = await miner.load().closed_loop(concurrency, seconds)
        stop.set()
        return outcomes, await flood

    outcomes, flood = asyncio.run(run())
    stats = summary(outcomes, seconds)
    stats.update(fault=f"{connections} slow-body connections", flood_answers=flood,
                 answered_share=round(stats["ok"] / max(1, stats["sent"]), 4))
    return stats


def replay_restart_run(miner: Miner, store_name: str) -> dict:
    """A request answered, the replay store killed and restarted by Ray, the same bytes again."""
    import ray

    from serve_app.client import signed_request

    body, headers = signed_request(miner.signer, PATH, {"input": "sent once"}, miner.hotkey)
    first = miner.http.post(PATH, content=body, headers=headers)
    ray.kill(ray.get_actor(store_name, namespace="torchrank"), no_restart=False)
    time.sleep(3.0)
    again = miner.http.post(PATH, content=body, headers=headers)
    deadline = time.monotonic() + 30
    fresh = None
    while time.monotonic() < deadline:  # honest requests signed after the restart: answered again
        body2, headers2 = signed_request(miner.signer, PATH, {"input": "signed afresh"}, miner.hotkey)
        fresh = miner.http.post(PATH, content=body2, headers=headers2)
        if fresh.status_code == 200:
            break
        time.sleep(0.25)
    return {"first": first.status_code, "replayed_after_restart": f"{again.status_code} {again.json().get('error', '')}",
            "fresh_after_restart": fresh.status_code if fresh is not None else None}


def breaker_stats(outcomes, fault_at_s: float) -> dict:
    """When the breakers opened after the fault, how fast they refused, when answers came back."""
    opened = sorted((o for o in outcomes if o.error == "breaker_open"), key=lambda o: o.sent_at)
    if not opened:
        return {"breaker_opened": False}
    first_open = opened[0].sent_at
    back = [o.sent_at for o in outcomes if o.status == 200 and o.sent_at > first_open]
    fast = sorted(o.seconds * 1000 for o in opened)
    return {"breaker_opened": True, "open_after_s": round(first_open - fault_at_s, 1),
            "breaker_open_answers": len(opened), "breaker_open_p50_ms": round(fast[len(fast) // 2], 1),
            "first_200_after_open_s": round(min(back) - first_open, 1) if back else None}


TEXT = "validators send short texts like this one to be embedded by the miner today"


def flood_headers(kind: str) -> list[str]:
    """h2load -H values for a flood: no auth headers, a stranger's unregistered hotkey, or //Alice's
    hotkey with a signature that does not verify (the one kind HAProxy cannot refuse by itself)."""
    base = ["content-type: application/json"]
    if kind == "no-auth":
        return base
    hotkey = signer_for("//Dave" if kind == "unregistered" else "//Alice").ss58_address
    return base + [f"X-Bittensor-Version: 1", f"X-Bittensor-Hotkey: {hotkey}", "X-Bittensor-Nonce: 1",
                   "X-Bittensor-Signature: 0x" + "ab" * 64, f"X-Bittensor-Receiver: {signer_for('//Bob').ss58_address}"]


def h2load(url: str, rate: int, seconds: float, headers: list[str]) -> dict:
    """An open-loop flood from C: `rate` new connections a second, one request each."""
    import re
    import subprocess
    import tempfile

    import shutil

    if shutil.which("h2load") is None:
        raise SystemExit("h2load is missing: apt-get install nghttp2-client (Debian)")
    n = int(rate * seconds)
    with tempfile.NamedTemporaryFile("wb", suffix=".json") as body:
        body.write(json.dumps({"input": TEXT}).encode())
        body.flush()
        cmd = ["h2load", "--h1", "-n", str(n), "-c", str(n), "-r", str(max(1, rate // 10)), "--rate-period", "100ms",
               "-m", "1", "-d", body.name, "-T", "10", "-N", "10"]
        for h in headers:
            cmd += ["-H", h]
        out = subprocess.run(cmd + [url + PATH], capture_output=True, text=True, timeout=seconds + 60).stdout
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                     r"(\d+) errored, (\d+) timeout", out)
    return {"offered_rps": rate, "sent": n,
            "status": dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, codes.groups()))) if codes else out[-400:],
            "done": int(done.group(3)) if done else None, "timeout": int(done.group(7)) if done else None}


def validator_load(url: str, receiver: str, timeout_s: float = 10.0) -> Load:
    return Load(url, signer_for("//Alice"), receiver, lambda i: (PATH, {"input": TEXT}), timeout_s=timeout_s,
                local_addr="127.0.0.2")


def cpu_by_kind(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds by part of the miner (and the clients) over a phase."""
    kinds = {"haproxy": "haproxy", "Router": "router", "Embeddings": "embeddings", "h2load": "h2load (client)",
             "reliability.py": "validator (Python client)", "gcs_server": "ray", "raylet": "ray",
             "ServeController": "ray", "dashboard": "ray", "HAProxyManager": "ray", "LedgerKeeper": "ray"}
    by_kind: dict[str, float] = {}
    for (pid, name), seconds in proc_cpu.spent(before, after).items():
        kind = "client (this Python process)" if pid == str(os.getpid()) else next(
            (k for word, k in kinds.items() if word in name), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    return {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}


def flood_phase(url: str, receiver: str, kind: str, rate: int, seconds: float) -> dict:
    import concurrent.futures

    before = proc_cpu.snapshot()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        flood = pool.submit(h2load, url, rate, seconds, flood_headers(kind)) if rate else None
        outcomes = asyncio.run(validator_load(url, receiver).closed_loop(4, seconds))
        flooded = flood.result() if flood else None
    cpu = cpu_by_kind(before, proc_cpu.snapshot())
    stats = summary(outcomes, seconds)
    out = {"flood": f"{kind} {rate}/s" if rate else "none", "validator": stats,
           "answered_share": round(stats["ok"] / max(1, stats["sent"]), 4), "cpu_s": cpu, "flood_result": flooded}
    if flooded and isinstance(flooded["status"], dict):
        refused = flooded["status"]["4xx"] + flooded["status"]["5xx"]
        out["haproxy_cpu_us_per_flood_request"] = round(cpu.get("haproxy", 0) / max(1, refused) * 1e6, 1)
    return out


def overload_phase(url: str, receiver: str, seconds: float) -> dict:
    signer = signer_for("//Alice")
    make = lambda i: (PATH, {"input": f"{TEXT} {i}"})  # noqa: E731
    capacity_load = Load(url, signer, receiver, make, timeout_s=10.0)
    before = proc_cpu.snapshot()
    # Signed as they are sent (0.1 ms each here): presigned ones went stale in a slow run.
    base = asyncio.run(capacity_load.closed_loop(32, seconds))
    base_cpu = cpu_by_kind(before, proc_cpu.snapshot())
    capacity = summary(base, seconds)
    rate = 4 * capacity["ok_rps"]
    over_load = Load(url, signer, receiver, make, timeout_s=6.0, headers={"X-Bittensor-Timeout": "5"})
    before = proc_cpu.snapshot()
    over = asyncio.run(over_load.open_loop(rate, seconds, connections=2048))
    cpu = cpu_by_kind(before, proc_cpu.snapshot())
    stats = summary(over, seconds)
    late = sum(1 for o in over if o.status == 0 or o.seconds > 6.0)
    return {"capacity": capacity, "capacity_cpu_s": base_cpu,
            "router_cpu_ms_per_answered_at_capacity": round(base_cpu.get("router", 0) * 1000 / max(1, capacity["ok"]), 3),
            "overload": stats, "overload_cpu_s": cpu,
            "answered_vs_capacity": round(stats["ok_rps"] / max(1e-9, capacity["ok_rps"]), 3),
            "unanswered_within_deadline_plus_1s": late,
            "http_500": sum(1 for o in over if o.status == 500)}


def edge_main(url: str, seconds: float, out: str, scenarios: list[str]) -> None:
    import httpx

    receiver = httpx.get(url + "/info", timeout=10).json()["hotkey"]
    # Warm: ready, and a few seconds of the validator's own traffic (its address becomes trusted).
    end = time.monotonic() + 120
    while httpx.get(url + "/ready", timeout=10).status_code != 200 and time.monotonic() < end:
        time.sleep(1)
    asyncio.run(validator_load(url, receiver).closed_loop(4, 3.0))
    results: dict = {"url": url, "seconds": seconds}
    if "floods" in scenarios:
        results["floods"] = [flood_phase(url, receiver, kind, rate, seconds) for kind, rate in
                             (("none", 0), ("no-auth", 5000), ("unregistered", 5000), ("wrong-signature", 1000),
                              ("none", 0))]
    if "overload" in scenarios:
        results["overload"] = overload_phase(url, receiver, seconds)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))
    for phase in results.get("floods", []):
        v = phase["validator"]
        print(f"flood {phase['flood']:24} validator {v['ok_rps']:7.1f} answered/s  {phase['answered_share']:.2%} "
              f"answered  p99 {v['ok_p99_ms']} ms  statuses {v['by_status']}  flood {phase['flood_result'] and phase['flood_result']['status']}"
              f"  haproxy us/flood req {phase.get('haproxy_cpu_us_per_flood_request', '-')}  cpu {phase['cpu_s']}")
    if "overload" in results:
        o = results["overload"]
        print("capacity", json.dumps({k: o["capacity"][k] for k in ("ok_rps", "ok_p99_ms", "by_status")}),
              "router ms/answered", o["router_cpu_ms_per_answered_at_capacity"], "cpu", o["capacity_cpu_s"])
        print("overload", json.dumps({k: o["overload"][k] for k in ("offered_rps", "ok_rps", "refused_p50_ms",
                                                                   "refused_p99_ms", "by_status")}),
              "answered/capacity", o["answered_vs_capacity"], "unanswered by deadline+1s",
              o["unanswered_within_deadline_plus_1s"], "500s", o["http_500"], "cpu", o["overload_cpu_s"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--port", type=int, default=8131)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/reliability.json"))
    parser.add_argument("--against", help="a running miner's URL (make run): the edge's floods and overload")
    parser.add_argument("--scenarios", default="floods,overload", help="with --against: floods, overload")
    args = parser.parse_args()
    if args.against:
        return edge_main(args.against.rstrip("/"), args.seconds, args.out.replace("reliability.json", "edge.json"),
                         args.scenarios.split(","))

    rayenv.apply()
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    cfg = config()
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    miner = Miner(args.port)
    replicas = {"Router": 2, "Embeddings": 2}
    miner.wait_healthy(replicas)
    seconds = args.seconds
    results = {}
    try:
        base = asyncio.run(miner.load().closed_loop(16, seconds))
        results["baseline"] = summary(base, seconds)
        capacity = results["baseline"]["ok_rps"]
        over = asyncio.run(miner.load().open_loop(4 * capacity, seconds))
        results["overload"] = {**summary(over, seconds), "fault": f"open loop at 4 x {capacity} req/s"}
        miner.wait_healthy(replicas)
        results["kill-workload"] = fault_run(miner, replicas, 8, seconds, "Embeddings")[0]
        results["kill-router"] = fault_run(miner, replicas, 4, seconds, "Router")[0]
        miner.wait_healthy(replicas)
        miner.wait_answering()
        results["slow-bodies"] = flood_run(miner, args.port, 4, seconds)
        results["replay-restart"] = replay_restart_run(miner, f"{cfg.name}-nonces")
        # Last: it leaves the workload's measured drain rate low for a while (calls that waited
        # for replicas that did not exist drained nothing) and a breaker half-open.
        miner.wait_healthy(replicas)
        # Both Embeddings replicas gone: calls wait for a replica until their 1.5 s deadline,
        # then the breakers open and refuse at once until a probe succeeds.
        stats, outcomes, fault_at = fault_run(miner, replicas, 8, 3 * seconds, "Embeddings", how_many=2, timeout_s=1.5)
        results["breaker"] = {**stats, **breaker_stats(outcomes, fault_at)}
    finally:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        serve.shutdown()
        ray.shutdown()
    print(f"{'scenario':14} {'load':>22} {'sent':>6} {'ok':>6} {'refused':>8} {'lost':>5} {'ok p99 ms':>10} "
          f"{'refused p50 ms':>15} {'recover s':>10}")
    for name in ("baseline", "overload", "kill-workload", "kill-router", "breaker", "slow-bodies"):
        r = results[name]
        print(f"{name:14} {str(r['offered_rps']) + ' req/s offered':>22} {r['sent']:>6} {r['ok']:>6} {r['refused']:>8} "
              f"{r['failed']:>5} {str(r['ok_p99_ms']):>10} {str(r['refused_p50_ms']):>15} {str(r.get('recover_s', '-')):>10}")
    print("breaker", json.dumps({k: v for k, v in results["breaker"].items() if "open" in k or "200" in k}))
    print("statuses", json.dumps({k: results[k]["by_status"]
                                  for k in ("overload", "kill-workload", "kill-router", "breaker", "slow-bodies")}))
    print("slow-bodies", json.dumps({k: results["slow-bodies"][k] for k in ("answered_share", "flood_answers")}))
    print("replay-restart", json.dumps(results["replay-restart"]))


if __name__ == "__main__":
    main()
