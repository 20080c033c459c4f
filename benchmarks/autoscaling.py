"""Autoscaling under a load step: time until p95 is back under the SLO, replicas over time.

    .venv/bin/python benchmarks/autoscaling.py [--step-s 60] [--after-s 40]

The replicas are accelerator-bound stand-ins: each runs the miner's batching machinery
(CoalescingRunner on an engine thread, LoadWindow, record_autoscaling_stats) over a
"device" that takes `--batch-s` per batch of up to `--batch` items and leaves the host
CPU idle, as a GPU does. This host has 2 CPU cores, so a CPU model's capacity cannot be
multiplied by adding replicas here; a device-bound replica's can, which is the case the
autoscaler is for. The policy, Serve's autoscaler and the metric push path are the real ones.

One replica's capacity is batch / batch_s requests/s. The load is open loop (a fixed
arrival rate): 0.5 x capacity for `--warm-s`, then a step to 4 x capacity for `--step-s`,
then 0.5 x capacity again for `--after-s` (scale-down, one replica per quiet period). Writes
benchmarks/results/autoscaling.json and benchmarks/results/autoscaling.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serve_app.config import ReplicaAutoscaling  # noqa: E402
from loadgen import percentile  # noqa: E402
from serve_app.ops.autoscaling import serve_autoscaling_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
APP = "autoscaling-bench"


def make_deployment():
    from ray import serve

    @serve.deployment(name="Device", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.1})
    class Device:
        """A replica whose model is a device with a fixed time per batch."""

        def __init__(self, batch: int, batch_s: float):
            from serve_app.inference.coalesce import CoalescingRunner
            from serve_app.inference.thread import EngineThread
            from serve_app.ops.autoscaling import LoadWindow

            self.batch_s = batch_s
            self.runner = CoalescingRunner(EngineThread("device"), self._pass, max_items=batch)
            self.load = LoadWindow()

        def _pass(self, items: list):
            time.sleep(self.batch_s)  # the device works; the host CPU is free
            return (items,)

        async def __call__(self, item: int) -> int:
            with self.load.track():
                (out,) = await self.runner.run([item])
            return out[0]

        def record_autoscaling_stats(self) -> dict[str, float]:
            return self.load.stats(queued=self.runner.queued_items)

    return Device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batch-s", type=float, default=0.25)
    parser.add_argument("--slo-s", type=float, default=1.0)
    parser.add_argument("--max-replicas", type=int, default=8)
    parser.add_argument("--quiet-s", type=float, default=10.0)
    parser.add_argument("--warm-s", type=float, default=10.0)
    parser.add_argument("--step-s", type=float, default=60.0)
    parser.add_argument("--after-s", type=float, default=90.0)
    parser.add_argument("--step", type=float, default=4.0, help="load during the step, x one replica's capacity")
    args = parser.parse_args()

    import ray
    from ray import serve

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    scaling = ReplicaAutoscaling(min_replicas=1, max_replicas=args.max_replicas, quiet_period_s=args.quiet_s)
    autoscaling = serve_autoscaling_config(scaling, latency_slo_s=args.slo_s, target_queued=args.batch)
    device = make_deployment().options(autoscaling_config=autoscaling)
    handle = serve.run(device.bind(args.batch, args.batch_s), name=APP, route_prefix=None)
    capacity = args.batch / args.batch_s

    replicas: list[tuple[float, int, int]] = []  # (t, running, running + starting)
    stop = threading.Event()
    t0 = time.perf_counter()

    def watch():
        while not stop.is_set():
            states = serve.status().applications[APP].deployments["Device"].replica_states
            running = states.get("RUNNING", 0)
            replicas.append((time.perf_counter() - t0, running, running + states.get("STARTING", 0)))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    phases = [(args.warm_s, 0.5), (args.step_s, args.step), (args.after_s, 0.5)]
    sent: list[tuple[float, float, bool]] = []  # (sent at, seconds, ok)

    async def one(at: float):
        try:
            await handle.remote(1)
            ok = True
        except Exception:
            ok = False
        sent.append((at, time.perf_counter() - t0 - at, ok))

    async def drive():
        tasks, start = [], 0.0
        for seconds, factor in phases:
            rate = capacity * factor
            n = int(seconds * rate)
            for i in range(n):
                at = start + i / rate
                delay = at - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(at)))
            start += seconds
        await asyncio.gather(*tasks)

    watcher.start()
    asyncio.run(drive())
    stop.set()
    watcher.join()
    serve.delete(APP)
    ray.shutdown()

    step_start, step_end = args.warm_s, args.warm_s + args.step_s
    # p95 by send time over 2-second windows: what a validator sending then saw.
    windows = []
    t = 0.0
    while t < step_end + args.after_s:
        lat = [s for a, s, _ in sent if t <= a < t + 2.0]
        windows.append((t, percentile(lat, 0.95) if lat else None))
        t += 1.0
    over = [w for w, p in windows if step_start <= w < step_end and p is not None and p > args.slo_s]
    back_under = (max(over) + 1.0 - step_start) if over else 0.0  # the first window after the last miss
    peak = max((r for _, _, r in replicas), default=0)
    step_lat = [s for a, s, _ in sent if step_start <= a < step_end]
    result = {
        "capacity_per_replica_rps": capacity,
        "step_rps": capacity * args.step,
        "slo_p95_s": args.slo_s,
        "requests": len(sent),
        "failed": sum(1 for _, _, ok in sent if not ok),
        "seconds_until_p95_back_under_slo": round(back_under, 1),
        "step_p95_s": round(percentile(step_lat, 0.95), 3),
        "peak_p95_s": round(max(p for _, p in windows if p is not None), 3),
        "peak_replicas": peak,
        "replicas_at_end": replicas[-1][1] if replicas else None,
        # Cost: replica-seconds held over the run (running replicas, sampled every 0.5 s).
        "replica_seconds": round(sum(r * 0.5 for _, r, _ in replicas), 1),
        "back_to_one_replica_after_load_s": next(
            (round(t - step_end, 1) for t, r, _ in replicas if t >= step_end and r == 1), None),
        "first_scale_up_s": next((round(t - step_start, 1) for t, _, r in replicas if t >= step_start and r > 1), None),
        "args": vars(args),
        "replicas": replicas,
        "p95_windows": windows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "autoscaling.json").write_text(json.dumps(result, indent=1))
    plot(result, step_start, step_end, RESULTS / "autoscaling.png")
    print(json.dumps({k: v for k, v in result.items() if k not in ("replicas", "p95_windows")}, indent=1))


def plot(result: dict, step_start: float, step_end: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, latency = plt.subplots(figsize=(10, 5))
    xs = [t + 1.0 for t, p in result["p95_windows"] if p is not None]  # at the window's middle
    latency.plot(xs, [p for _, p in result["p95_windows"] if p is not None], color="tab:red", label="p95 latency (2 s windows)")
    latency.axhline(result["slo_p95_s"], color="tab:red", linestyle="--", linewidth=1, label="SLO")
    latency.set_yscale("log")
    latency.set_xlabel("seconds")
    latency.set_ylabel("p95 latency, s (log)")
    latency.axvspan(step_start, step_end, color="grey", alpha=0.12, label=f"load {result['step_rps']:.0f} req/s "
                    f"(4 x one replica)")
    count = latency.twinx()
    count.step([t for t, _, _ in result["replicas"]], [r for _, r, _ in result["replicas"]], where="post",
               color="tab:blue", label="replicas running")
    count.step([t for t, _, _ in result["replicas"]], [r for _, _, r in result["replicas"]], where="post",
               color="tab:blue", linestyle=":", label="replicas running + starting")
    count.set_ylabel("replicas")
    count.set_ylim(0, result["args"]["max_replicas"] + 1)
    handles = latency.get_legend_handles_labels()[0] + count.get_legend_handles_labels()[0]
    labels = latency.get_legend_handles_labels()[1] + count.get_legend_handles_labels()[1]
    latency.legend(handles, labels, loc="upper right", fontsize=8)
    latency.set_title(f"Step to 4 x one replica's capacity: p95 back under the SLO after "
                      f"{result['seconds_until_p95_back_under_slo']} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
