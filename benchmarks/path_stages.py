"""Where the CPU goes on the request path: each stage's cost by process, measured in one run.

    .venv/bin/python benchmarks/path_stages.py [--requests 1000] [--json PATH] [--profile PATH]

The embedded default (deployments/local.yaml, presigned requests allowed 300 s) under the
shipped deployments/ray.env (HAProxy in front, the edge on), plus two bare apps that show
Serve's own floor. Requests that stop at successive stages:

  floor          GET /floor: Serve's direct ingress and a deployment that answers at once
                 (no FastAPI, no miner code): what any Serve ingress costs per request
  floor-fastapi  GET /floor-fastapi: the same through a FastAPI app, as the Router is built
  health         GET /health: the Router, no checks
  unsigned-401   POST without auth headers: HAProxy refuses it at the edge (the Router never sees it)
  signed-422     signature, replay claim, authorisation, a body that fails its schema: no model
  embed-200      a single-text embedding, answered

First the processes' CPU over 10 s with no requests (the Router's own loops: monitor, edge sync,
metrics, ledger), which the per-request figures below include. For each stage: c=1 p50, c=32
requests/s with the status counts, and the CPU ms per request by
process over the c=32 phase (from /proc; the client is this process, aiohttp). `--profile`
records the Router with py-spy over the embed-200 c=32 phase (raw collapsed stacks, for a
flame graph or `sort | uniq`; py-spy's sampling costs the router some CPU, so take the CPU
figures from a run without it).
"""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import proc_cpu  # noqa: E402
from embeddings import corpus, drive, pct  # noqa: E402

from serve_app import rayenv  # noqa: E402
from serve_app.app import build_app, load_config  # noqa: E402
from serve_app.client import signed_request, signer_for  # noqa: E402

STAGES = ("floor", "floor-fastapi", "health", "unsigned-401", "signed-422", "embed-200")
IDLE_S = 10


def floor_apps():
    from fastapi import FastAPI
    from ray import serve
    from starlette.responses import Response

    @serve.deployment(name="Floor", ray_actor_options={"num_cpus": 0})
    class Floor:
        async def __call__(self, request):
            return Response(b'{"status":"ok"}', media_type="application/json")

    api = FastAPI()

    @serve.deployment(name="FloorFastAPI", ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class FloorFastAPI:
        @api.get("/")
        def get(self):
            return Response(b'{"status":"ok"}', media_type="application/json")

    return Floor.bind(), FloorFastAPI.bind()


def cpu_ms_per_request(before: dict, after: dict, requests: int, top: int = 6) -> dict[str, float]:
    """By process name, largest first; this process (the client) named so."""
    by_name: dict[str, float] = {}
    for (pid, name), seconds in proc_cpu.spent(before, after).items():
        name = "client (this process)" if pid == str(os.getpid()) else name.removeprefix("ray::ServeReplica:")
        by_name[name] = by_name.get(name, 0.0) + seconds
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {name: round(seconds * 1000 / requests, 2) for name, seconds in ranked}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per c=32 phase")
    parser.add_argument("--port", type=int, default=8125)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "path_stages.json")
    parser.add_argument("--profile", type=Path, help="py-spy's raw stacks of the Router over the embed-200 phase")
    args = parser.parse_args()

    rayenv.apply()
    import ray
    from ray import serve

    base = load_config(ROOT / "deployments" / "local.yaml")
    subnet = base.subnets[0].model_copy(update={"auth": base.subnets[0].auth.model_copy(update={"max_age_s": 300.0})})
    cfg = base.model_copy(update={"subnets": (subnet,)})
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(cfg), name="stages", route_prefix="/")
    floor, floor_fastapi = floor_apps()
    serve.run(floor, name="floor", route_prefix="/floor")
    serve.run(floor_fastapi, name="floor-fastapi", route_prefix="/floor-fastapi")
    url = f"http://127.0.0.1:{args.port}"
    signer, miner, texts = signer_for("//Alice"), cfg.wallet.hotkey_ss58(), corpus(1200)
    path = "/v1/embeddings"

    def requests(stage: str, n: int) -> tuple[str, str, list]:
        """(method, path, [(body, headers)] * n) for a stage."""
        if stage in ("floor", "floor-fastapi", "health"):
            return "GET", "/" + stage, [(None, {})] * n
        if stage == "unsigned-401":
            return "POST", path, [(b'{"input": "x"}', {"Content-Type": "application/json"})] * n
        key = "inputs" if stage == "signed-422" else "input"
        return "POST", path, [signed_request(signer, path, {key: texts[i % len(texts)]}, miner) for i in range(n)]

    def run(stage: str, n: int, concurrency: int):
        method, where, prepared = requests(stage, n)
        return asyncio.run(drive(url + where, prepared, concurrency, method))

    results = {}
    try:
        # A verified request makes this address trusted at the edge (strangers get 20/s), and the
        # edge's maps fill; then every stage warms up before it is measured.
        run("embed-200", 20, 1)
        time.sleep(2)
        before = proc_cpu.snapshot()
        time.sleep(IDLE_S)
        idle = cpu_ms_per_request(before, proc_cpu.snapshot(), IDLE_S)
        results["idle"] = {"cpu_ms_per_s": idle}
        print("idle, CPU ms per second by process: " + ", ".join(f"{name} {ms}" for name, ms in idle.items()))
        print(f"{'stage':<14} {'c1 p50 ms':>9} {'c32 req/s':>9}  statuses      CPU ms per request by process")
        for stage in STAGES:
            run(stage, 20, 4)
            lat, _, _ = run(stage, 150, 1)
            method, where, prepared = requests(stage, args.requests)  # signed before the clock starts
            spy = py_spy("stages:Router", args.profile) if args.profile and stage == "embed-200" else None
            before = proc_cpu.snapshot()
            _, statuses, wall = asyncio.run(drive(url + where, prepared, 32, method))
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            cpu = cpu_ms_per_request(before, proc_cpu.snapshot(), args.requests)
            results[stage] = {"c1_p50_ms": round(pct(lat, 0.5), 2), "c32_per_s": round(args.requests / wall, 1),
                              "statuses": statuses, "cpu_ms_per_request": cpu}
            shown = ", ".join(f"{name} {ms}" for name, ms in cpu.items())
            print(f"{stage:<14} {pct(lat, 0.5):>9.1f} {args.requests / wall:>9.0f}  {str(statuses):<13} {shown}",
                  flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
