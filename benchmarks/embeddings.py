"""Embeddings: the raw model vs the full signed path through the miner, in one run.

    .venv/bin/python benchmarks/embeddings.py [--quick] [--router-replicas N]

1. Raw model, in this process (the same engine class the replica uses, no Serve):
   batches of 32 texts, and one text at a time.
2. The miner from deployments/local.yaml under `serve`, driven over HTTP with requests
   signed by //Alice (btauth/1): single-text requests at concurrency 1, 8 and 32, and
   32-text requests at concurrency 4. Requests are signed before each phase so the
   client's signing does not compete with the miner for the CPU (validators sign on
   their own machines); the benchmark's subnet allows a 300 s nonce age for that.

Prints a table and one JSON line; targets are from issue 2.
"""

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import proc_cpu  # noqa: E402
from serve_app import rayenv  # noqa: E402
from serve_app.app import build_app, load_config  # noqa: E402
from serve_app.client import signed_request, signer_for  # noqa: E402

WORDS = ("miner validator subnet embedding latency batch stake permit reward score accuracy replica "
         "router request deadline queue throughput model vector token signature hotkey chain block "
         "the a of to and in is for on with as by at from").split()


def corpus(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40))) for _ in range(n)]


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def raw_model(cfg, texts, seconds):
    from serve_app.engines.embeddings import SentenceEmbeddingEngine

    engine = SentenceEmbeddingEngine(cfg.workloads.embeddings, num_threads=cfg.workloads.embeddings.torch_threads or 2)
    out = {}
    for name, size in (("batched_32", 32), ("single", 1)):
        done, lat, start, i = 0, [], time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            engine.encode(texts[i : i + size] if i + size <= len(texts) else texts[:size])
            lat.append((time.perf_counter() - t0) * 1000)
            done += size
            i = (i + size) % len(texts)
        wall = time.perf_counter() - start
        out[name] = {"texts_per_s": done / wall, "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99)}
    del engine
    return out


async def drive(url, prepared, concurrency):
    import aiohttp

    latencies, statuses = [], {}
    queue = list(prepared)
    queue.reverse()

    async def worker(session):
        while queue:
            body, headers, n = queue.pop()
            t0 = time.perf_counter()
            send = session.get(url) if body is None else session.post(url, data=body, headers=headers)
            async with send as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
            latencies.append((time.perf_counter() - t0) * 1000)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return latencies, statuses, wall


def served(url, miner_hotkey, texts, phases):
    signer = signer_for("//Alice")
    results = {}

    def prepare(count, per_request):
        # Each request signed once: a second send of the same one is a replay (401).
        out = []
        for i in range(count):
            chunk = [texts[(i * per_request + j) % len(texts)] for j in range(per_request)]
            payload = {"input": chunk[0] if per_request == 1 else chunk}
            body, headers = signed_request(signer, "/v1/embeddings", payload, miner_hotkey)
            out.append((body, headers, per_request))
        return out

    for name, concurrency, per_request, count in phases:
        asyncio.run(drive(url, prepare(max(concurrency * 2, 8), per_request), concurrency))  # warm up
        prepared = prepare(count, per_request)
        before = proc_cpu.snapshot()
        latencies, statuses, wall = asyncio.run(drive(url, prepared, concurrency))
        cpu = proc_cpu.per_request_ms(before, proc_cpu.snapshot(), count)
        ok = statuses.get(200, 0)
        results[name] = {
            "concurrency": concurrency, "texts_per_request": per_request, "requests": count,
            "statuses": statuses, "texts_per_s": ok * per_request / wall, "req_per_s": ok / wall,
            "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99), "cpu_ms_per_request": cpu,
        }
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--router-replicas", type=int, default=1)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "embeddings.json"))
    args = ap.parse_args()
    scale = 0.25 if args.quick else 1.0

    base = load_config(ROOT / "deployments" / "local.yaml")
    subnet = base.subnets[0]
    subnet = subnet.model_copy(update={"auth": subnet.auth.model_copy(update={"max_age_s": 300.0})})
    cfg = base.model_copy(update={
        "subnets": (subnet,),
        "router": base.router.model_copy(update={"num_replicas": args.router_replicas}),
    })
    texts = corpus(2048)

    raw = raw_model(cfg, texts, seconds=8 * scale + 2)

    import ray
    from ray import serve

    rayenv.apply()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(cfg), name="bench", route_prefix="/")
    phases = [
        ("c1_single", 1, 1, int(300 * scale)),
        ("c8_single", 8, 1, int(1200 * scale)),
        ("c32_single", 32, 1, int(2000 * scale)),
        ("c4_batch32", 4, 32, int(96 * scale)),
    ]
    try:
        path = served(f"http://127.0.0.1:{args.port}/v1/embeddings", cfg.wallet.hotkey_ss58(), texts, phases)
    finally:
        serve.shutdown()
        ray.shutdown()

    batched = raw["batched_32"]["texts_per_s"]
    for r in path.values():
        r["ratio_to_raw_batched"] = r["texts_per_s"] / batched
    checks = {
        "c32_single >= 0.6x raw": path["c32_single"]["ratio_to_raw_batched"] >= 0.6,
        "c32_single p99 <= 250ms": path["c32_single"]["p99_ms"] <= 250,
        "c4_batch32 >= 0.9x raw": path["c4_batch32"]["ratio_to_raw_batched"] >= 0.9,
        "c1 p50 <= raw single p50 + 8ms": path["c1_single"]["p50_ms"] <= raw["single"]["p50_ms"] + 8,
    }

    print(f"\nraw model: batched(32) {batched:.0f} texts/s, p50 {raw['batched_32']['p50_ms']:.1f} ms/batch; "
          f"single {raw['single']['texts_per_s']:.0f} texts/s, p50 {raw['single']['p50_ms']:.1f} ms")
    print(f"{'phase':<12} {'conc':>4} {'texts/req':>9} {'texts/s':>8} {'x raw':>6} {'p50 ms':>7} {'p99 ms':>7}  statuses")
    for name, r in path.items():
        print(f"{name:<12} {r['concurrency']:>4} {r['texts_per_request']:>9} {r['texts_per_s']:>8.0f} "
              f"{r['ratio_to_raw_batched']:>6.2f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f}  {r['statuses']}")
    for name, r in path.items():
        print(f"  CPU ms/request {name}: " + ", ".join(f"{p} {ms}" for p, ms in r["cpu_ms_per_request"].items()))
    for name, passed in checks.items():
        print(f"  [{'ok' if passed else 'MISS'}] {name}")
    record = {"benchmark": "embeddings", "router_replicas": args.router_replicas, "raw": raw, "served": path, "targets": checks}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
