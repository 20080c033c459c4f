"""What every workload replica (Embeddings, Diffusion, Agents) shares: `WorkloadReplica`.

It starts the engine on the replica's engine thread, owns the metrics, the load window and
the periodic loops, publishes the common gauges, and answers Serve's hooks
(`record_autoscaling_stats`, `check_health`, `__del__`) and `info`. A workload adds its
request path (batching over CoalescingRunners), says what is queued and whether it is
idle, and keeps its own `stats`. Model calls go through `model_call`, so the health check
knows one is running and for how long.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from typing import Callable, Iterable, Optional, TypeVar

from serve_app.engines.base import Engine, UnloadedEngine
from serve_app.inference.coalesce import CoalescingRunner
from serve_app.inference.thread import EngineThread
from serve_app.observability import logs
from serve_app.observability.metrics import GAUGE_PERIOD_S, WorkloadMetrics
from serve_app.ops.autoscaling import LoadWindow
from serve_app.ops.periodic import every

log = logging.getLogger("ray.serve.torchrank")
T = TypeVar("T")

# See serve_app/inference/coalesce.py: a CoalescingRunner under each @serve.batch merges the batches Serve cuts, so
# Serve's batch semaphore must never hold one back. Each cut batch holds at least one
# request, so this bound (the config's ceiling on max_ongoing_requests) never binds.
SERVE_BATCHES_IN_FLIGHT = 4096
PROBE_TIMEOUT_S = 20.0  # the idle health probe (Serve allows a check 30 s)
ENGINE_CLOSE_WAIT_S = 5.0  # a call still running on the engine thread when the replica stops


class _DropInapplicableBatchWarning(logging.Filter):
    """Serve warns that max_batch_size × max_concurrent_batches exceeds max_ongoing_requests;
    with the runner doing the merging that product means nothing, and the line misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in record.getMessage()


def serve_batch_size(size_of: Callable[[tuple], int]) -> Callable[[list], int]:
    """A `batch_size_fn` for @serve.batch: the sum of size_of(item), or the item count if that
    fails. It must never raise: an exception kills Serve's batch loop."""

    def size(batch: list) -> int:
        try:
            return sum(size_of(item) for item in batch)
        except Exception:
            return len(batch)

    return size


class WorkloadReplica:
    """The skeleton of a workload deployment. A subclass keeps `@serve.deployment(name=...)`,
    calls `super().__init__` first, then sets `self.runner` (or overrides `runners_in_use`),
    and defines `stats`.

    `build(cfg, threads)` makes the engine (an Engine: in process, or an EngineProcess via
    functools.partial); `role` "candidate" (a rollout's, serve_app/app.py): a model that does
    not load leaves an UnloadedEngine, whose calls fail, instead of failing the replica; `cfg` is the workload's config: runtime.cpu_nice, runtime.torch_threads
    and placement.num_cpus size it, and a model call running longer than runtime.stuck_call_s
    fails the health check.
    """

    call_noun = "model call"  # for the health check's message

    def __init__(self, name: str, cfg, build: Callable[..., Engine], role: str = "stable"):
        logging.getLogger("ray.serve").addFilter(_DropInapplicableBatchWarning())
        os.nice(cfg.runtime.cpu_nice)  # before the engine, its threads and processes exist: they inherit it
        self.name, self.cfg, self.stuck_call_s = name, cfg, cfg.runtime.stuck_call_s
        self.engine_thread = EngineThread(name)
        threads = cfg.runtime.torch_threads or max(1, int(cfg.placement.num_cpus))
        try:
            self.engine = self.engine_thread.run_sync(build, cfg, threads)  # loaded and warmed up on its thread
        except Exception as exc:
            if role != "candidate":
                raise
            log.error("the candidate model %s did not load: %s", cfg.model.id, exc)
            self.engine = UnloadedEngine(cfg.model.id, f"{type(exc).__name__}: {exc}"[:300])
        self.engine_info = self.engine_thread.run_sync(self.engine.info)  # fixed for the replica's life
        self.metrics = WorkloadMetrics(name)
        self.load = LoadWindow()  # latencies and in-flight requests, for the autoscaler
        self.call_started: Optional[float] = None  # perf_counter at the start of the running model call
        self.calls_started = 0
        self._waiting_since: Optional[tuple[int, float]] = None  # (calls_started, when) work was seen waiting
        self.retired = False  # the losing side of a rollout: model freed (reconfigure)
        gauges = every(GAUGE_PERIOD_S, self._publish_gauges, f"publishing {name} gauges")
        self._background = [asyncio.create_task(gauges), asyncio.create_task(logs.flush_every())]

    # What a workload may change.
    def runners_in_use(self) -> Iterable[CoalescingRunner]:
        """The CoalescingRunners in front of the engine: by default the workload's `self.runner`."""
        return (self.runner,)

    def publish_workload_gauges(self) -> None:
        """The workload's own gauges, each gauge period (after in_flight and queued)."""

    # What the skeleton does.
    @property
    def queued_items(self) -> int:
        """Items waiting for the model (not those of the running call)."""
        return sum(runner.queued_items for runner in self.runners_in_use())

    @property
    def idle(self) -> bool:
        """Nothing queued and no call running: the health check may probe the model."""
        return all(runner.idle for runner in self.runners_in_use())

    def model_call(self, fn: Callable[..., T], *args) -> tuple[T, float]:
        """(fn(*args), seconds): one model call, on the engine thread, seen by the health check."""
        self.call_started = started = time.perf_counter()
        self.calls_started += 1
        try:
            result = fn(*args)
        finally:
            self.call_started = None
        return result, time.perf_counter() - started

    async def _publish_gauges(self) -> None:
        # Sampled here, off the request path; Ray exports them every few seconds anyway.
        self.metrics.in_flight.set(self.load.in_flight, self.metrics.tags)
        self.metrics.queued.set(self.queued_items, self.metrics.tags)
        self.publish_workload_gauges()
        if self.engine_info["device"] == "cuda":  # read where the model runs, between calls
            self.metrics.record_gpu(await self.engine_thread.run(self.engine.gpu_usage))

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this for the autoscaling policy (serve_app/ops/autoscaling.py)."""
        return self.load.stats(queued=self.queued_items)

    def info(self) -> dict:
        return {**self.engine_info, "status": "retired"} if self.retired else self.engine_info

    def reconfigure(self, user_config: dict) -> None:
        """Serve's in-place update. `{"retired": true}`: this deployment lost a rollout
        (serve_app/router/rollouts.py retires it); the model is freed (memory, GPU memory) and
        the replica, which gets no more calls, stays an empty shell."""
        if user_config.get("retired") and not self.retired:
            self.retired = True
            log.warning("retired after a rollout: %s freed", self.engine_info.get("model"))
            self.close()

    async def check_health(self) -> None:
        if self.retired:  # no model to probe, and none needed
            return
        # Busy: a call in progress shows the model works, unless it has run too long (wedged).
        # Idle: a real, cheap call (the engine's probe). Work waiting with no call running (the
        # engine thread held by something else): fails once no call has started for stuck_call_s.
        started, now = self.call_started, time.perf_counter()
        if started is not None:
            self._waiting_since = None
            if now - started > self.stuck_call_s:
                raise RuntimeError(f"a {self.call_noun} has run for over {self.stuck_call_s:.0f}s")
        elif self.idle:
            self._waiting_since = None
            await asyncio.wait_for(self.engine_thread.run(self.engine.probe), timeout=PROBE_TIMEOUT_S)
        else:
            if self._waiting_since is None or self._waiting_since[0] != self.calls_started:
                self._waiting_since = (self.calls_started, now)
            if now - self._waiting_since[1] > self.stuck_call_s:
                raise RuntimeError(f"work has waited {now - self._waiting_since[1]:.0f}s with no {self.call_noun} "
                                   f"started")

    def close(self) -> None:
        """Stop the loops, free the model (a child process is killed and reaped) and stop the
        engine thread. Idempotent; safe on a replica whose constructor failed part way."""
        for task in getattr(self, "_background", ()):
            try:
                task.cancel()
            except RuntimeError:  # the loop is closed already (a replica collected late)
                pass
        self._background = []
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            try:
                try:
                    # On its thread, after the call running there: an in-process model is not freed under it.
                    self.engine_thread.run_sync(engine.close, timeout=ENGINE_CLOSE_WAIT_S)
                except (concurrent.futures.TimeoutError, RuntimeError):  # wedged, or the thread is shut down
                    engine.close()
            except Exception:
                log.exception("closing the %s engine failed", getattr(self, "name", "workload"))
        if getattr(self, "engine_thread", None) is not None:
            self.engine_thread.close()

    def __del__(self):
        # Serve calls this once when it stops the replica, after draining its requests.
        self.close()
