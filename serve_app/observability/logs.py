"""Structured request logs: one JSON line per request in the replica's Serve log file.

Serve writes the `ray.serve` logger of a replica to
`<ray logs>/serve/replica_<app>_<deployment>_<id>.log`; with the deployments'
`logging_config: {encoding: JSON}` each line is a JSON object carrying Serve's own
fields (request_id, deployment, replica, timestamp) and ours (netuid, caller,
caller_class, outcome, status, ms). Never bodies, signatures or keys.

Serve's throughput profile buffers these lines in memory (up to 1000); `flush_every`
writes them out at least every second so a quiet miner's log is never hours behind.
"""

from __future__ import annotations

import logging

from serve_app.ops.periodic import every

# A child of Serve's logger: Serve's handlers (file, JSON encoding, request context) apply.
log = logging.getLogger("ray.serve.torchrank")
log.setLevel(logging.INFO)

# Every replica: JSON lines, and no Serve access line per request. The router's request line
# (request_line) is the access log: it has the request id, outcome and time, and a second line per
# request cost the router ~0.1 ms and the model's process CPU (benchmarks/README.md, the edge).
REPLICA_LOGS = {"encoding": "JSON", "log_level": "INFO", "enable_access_log": False}


def request_line(**fields) -> None:
    log.info("request", extra=fields)


def flush() -> None:
    for handler in logging.getLogger("ray.serve").handlers:
        handler.flush()


async def flush_every(seconds: float = 1.0) -> None:
    await every(seconds, flush, "flushing the logs")
