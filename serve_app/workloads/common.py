"""What the workload deployments share: how an engine is started in a replica, and the
constants of the request path around it."""

from __future__ import annotations

import logging
import os
from typing import Callable, TypeVar

from serve_app.engines.thread import EngineThread

E = TypeVar("E")

# See serve_app/engines/coalesce.py: a CoalescingRunner under each @serve.batch merges the batches Serve cuts, so
# Serve's batch semaphore must never hold one back. Each cut batch holds at least one
# request, so this bound (the config's ceiling on max_ongoing_requests) never binds.
SERVE_BATCHES_IN_FLIGHT = 4096


class _DropInapplicableBatchWarning(logging.Filter):
    """Serve warns that max_batch_size × max_concurrent_batches exceeds max_ongoing_requests;
    with the runner doing the merging that product means nothing, and the line misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in record.getMessage()


def start_engine(name: str, cfg, engine_cls: Callable[..., E]) -> tuple[EngineThread, E]:
    """The replica's engine thread and its engine, built (loaded, warmed up) on that thread.

    `cfg` gives `cpu_nice`, `torch_threads` and `num_cpus`. `engine_cls` may also be a
    wrapper such as EngineProcess, called with (engine class, cfg, threads) via partial.
    """
    logging.getLogger("ray.serve").addFilter(_DropInapplicableBatchWarning())
    os.nice(cfg.cpu_nice)  # before the engine, its threads and processes exist: they inherit it
    thread = EngineThread(name)
    threads = cfg.torch_threads or max(1, int(cfg.num_cpus))
    return thread, thread.run_sync(engine_cls, cfg, threads)
