"""What the router's per-request observability costs: one `RouterMetrics.record` (the
latency histogram, outcome and egress counters, SLO counters), one gauge set and one
JSON request log line, each timed over 5,000 calls inside a Ray actor (Ray's metric
recorder is only live in a worker).

    .venv/bin/python benchmarks/observability_cost.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402


@ray.remote
class Probe:
    def run(self, n: int = 5000) -> dict:
        from serve_app.observability import logs
        from serve_app.observability.metrics import RouterMetrics

        metrics = RouterMetrics()

        def per_call_us(fn) -> float:
            start = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - start) / n * 1e6

        return {
            "record_us": per_call_us(lambda: metrics.record("1", "/v1/embeddings", "embeddings", "ok", "validator", 0.02, 8000, True, 1.0)),
            "gauge_set_us": per_call_us(lambda: metrics.in_flight.set(3, {"netuid": "1"})),
            "log_line_us": per_call_us(lambda: logs.request_line(netuid="1", caller="-", caller_class="validator",
                                                                  path="/v1/embeddings", status=200, outcome="ok",
                                                                  admitted=True, ms=1.0)),
        }


if __name__ == "__main__":
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    print({k: round(v, 1) for k, v in ray.get(Probe.remote().run.remote()).items()})
    ray.shutdown()
