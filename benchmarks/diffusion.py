"""Diffusion: the raw pipeline batched vs the full signed path, and cache hits (issue 5).

    .venv/bin/python benchmarks/diffusion.py [--seconds 20]

1. raw: the same DiffusionEngine the replica runs (tiny pipeline, preset `balanced`,
   64x64, 2 torch threads) called in-process with full batches of `max_batch_images`,
   and with one image (padded, as a lone request runs). The miner is not started yet.
2. The embedded default (deployments/local.yaml) under `serve`, driven over HTTP with
   requests signed by //Alice (one image each, preset `balanced`, a fresh seed each so
   nothing comes from the cache), closed loop at concurrency 1 and 8.
3. Cache hits: one request rendered once, then sent again and again (concurrency 1).
Results also go to benchmarks/results/diffusion.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serve_app import rayenv  # noqa: E402
from serve_app.app import build_app, load_config  # noqa: E402
from serve_app.client import signer_for  # noqa: E402
from serve_app.contracts import ImageJob  # noqa: E402
from loadgen import Load, summary  # noqa: E402

APP = "miner"
PATH = "/v1/images/generations"
PRESET = "balanced"


def config(cache_dir: str):
    args = load_config(ROOT / "deployments/local.yaml").model_dump()
    args["subnets"][0]["metagraph"]["path"] = str(ROOT / "deployments/local-metagraph.json")
    args["workloads"]["diffusion"]["runtime"]["cache_dir"] = cache_dir
    # Requests are signed before each phase (see Load.presign): valid for the whole phase.
    args["subnets"][0]["auth"]["max_age_s"] = 300.0
    return type(load_config(ROOT / "deployments/local.yaml")).model_validate(args)


def raw(cfg, seconds: float) -> dict:
    from serve_app.engines.diffusion import DiffusionEngine

    diffusion = cfg.workloads.diffusion
    engine = DiffusionEngine(diffusion, diffusion.runtime.torch_threads)
    spec = engine.preset_spec(PRESET)
    size = diffusion.batching.max_batch_images
    out = {}
    for name, n in (("raw_batched", size), ("raw_one_image", 1)):
        times, seed, end = [], 0, time.perf_counter() + seconds / 2
        while time.perf_counter() < end:
            jobs = [ImageJob(f"a validator's prompt {seed + i}", seed + i) for i in range(n)]
            started = time.perf_counter()
            engine.generate(jobs, spec)
            times.append(time.perf_counter() - started)
            seed += n
        out[name] = {"images_per_s": round(n * len(times) / sum(times), 2),
                     "call_p50_ms": round(statistics.median(times) * 1000, 1), "calls": len(times)}
    return out


def load(url, hotkey, make) -> Load:
    return Load(url, signer_for("//Alice"), hotkey, make, timeout_s=30.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=8132)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/diffusion.json"))
    args = parser.parse_args()
    seconds = args.seconds
    cfg = config(tempfile.mkdtemp(prefix="torchrank-bench-"))
    results = {"raw": raw(cfg, seconds)}

    rayenv.apply()
    import httpx
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    url, hotkey = f"http://127.0.0.1:{args.port}", signer_for("//Bob").ss58_address
    while httpx.get(url + "/ready").status_code != 200:
        time.sleep(0.5)
    stats = serve.get_deployment_handle("Diffusion", APP).stats
    try:
        for concurrency in (1, 8):
            before = stats.remote().result()
            base = 10_000 * concurrency  # fresh seeds: nothing from the cache
            requests = load(url, hotkey, lambda i: (PATH, {"prompt": f"a validator's prompt {i}",
                                                           "seed": base + i, "preset": PRESET}))
            ceiling = int(1.5 * results["raw"]["raw_batched"]["images_per_s"] * seconds) + 50
            outcomes = asyncio.run(requests.presign(ceiling).closed_loop(concurrency, seconds))
            after = stats.remote().result()
            calls = after["pipeline_calls"] - before["pipeline_calls"]
            rendered = after["images_rendered"] - before["images_rendered"]
            busy = after["busy_s"] - before["busy_s"]
            results[f"served_c{concurrency}"] = {**summary(outcomes, seconds), "pipeline_calls": calls,
                                                 "images_per_call": round(rendered / max(1, calls), 2),
                                                 "engine_busy": round(busy / seconds, 2),
                                                 "call_mean_ms": round(1000 * busy / max(1, calls), 1)}
        hit = {"prompt": "the same prompt again", "seed": 1, "preset": PRESET}
        asyncio.run(load(url, hotkey, lambda i: (PATH, hit)).closed_loop(1, 1))  # render it once
        before = stats.remote().result()
        outcomes = asyncio.run(load(url, hotkey, lambda i: (PATH, hit)).presign(3000).closed_loop(1, seconds / 2))
        after = stats.remote().result()
        results["cache_hit_c1"] = {**summary(outcomes, seconds / 2),
                                   "pipeline_calls": after["pipeline_calls"] - before["pipeline_calls"]}
    finally:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        serve.shutdown()
        ray.shutdown()

    batched = results["raw"]["raw_batched"]["images_per_s"]
    print(f"raw batched {batched} images/s (call p50 {results['raw']['raw_batched']['call_p50_ms']} ms); "
          f"raw one image {results['raw']['raw_one_image']['images_per_s']} images/s "
          f"(call p50 {results['raw']['raw_one_image']['call_p50_ms']} ms)")
    for name in ("served_c1", "served_c8", "cache_hit_c1"):
        r = results[name]
        print(f"{name:13} {r['ok_rps']:>7} images/s  x raw batched {r['ok_rps'] / batched:.2f}  "
              f"p50 {r['ok_p50_ms']} ms  p99 {r['ok_p99_ms']} ms  ok {r['ok']}/{r['sent']}  "
              f"calls {r['pipeline_calls']}  images/call {r.get('images_per_call', '-')}  "
              f"engine busy {r.get('engine_busy', '-')}  call mean {r.get('call_mean_ms', '-')} ms")


if __name__ == "__main__":
    main()
