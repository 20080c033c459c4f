"""The workload skeleton without Ray: GPU gauges set per device where CUDA is present, never
set (absent) on CPU; item counts; the gauges each period; health checks; a real stop."""

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from serve_app.engines.base import GeneratingEngine
from serve_app.inference.coalesce import CoalescingRunner
from serve_app.inference.gpu import gpu_usage
from serve_app.observability.metrics import WorkloadMetrics
from serve_app.workloads.replica import WorkloadReplica


class FakeGauge:
    def __init__(self):
        self.values = {}

    def set(self, value, tags):
        self.values[tags["gpu"]] = value


def fake_torch(available: bool, devices: int = 2):
    cuda = SimpleNamespace(
        is_available=lambda: available,
        device_count=lambda: devices,
        memory_allocated=lambda i: (i + 1) * 1000,
        utilization=lambda i: 40 + i,
    )
    return SimpleNamespace(cuda=cuda)


def test_gpu_gauges_per_device_when_cuda_is_present():
    m = WorkloadMetrics("diffusion")
    m.gpu_util, m.gpu_memory = FakeGauge(), FakeGauge()
    m.record_gpu(gpu_usage(fake_torch(True)))
    assert m.gpu_util.values == {"0": 0.40, "1": 0.41}
    assert m.gpu_memory.values == {"0": 1000, "1": 2000}


def test_no_gpu_gauge_is_set_on_cpu():
    m = WorkloadMetrics("embeddings")
    m.gpu_util, m.gpu_memory = FakeGauge(), FakeGauge()
    m.record_gpu(gpu_usage(fake_torch(False)))
    assert m.gpu_util.values == {} and m.gpu_memory.values == {}


class FakeCounter:
    def __init__(self):
        self.counts = {}

    def inc(self, value, tags):
        if value <= 0:
            raise ValueError("Ray's Counter refuses values <= 0")
        self.counts[tags["kind"]] = self.counts.get(tags["kind"], 0) + value


def test_record_pass_skips_zero_counts():
    # A full diffusion call pads 0 images: a refused inc(0) would fail a finished pass.
    m = WorkloadMetrics("diffusion")
    m.items, m.model_time, m.batch = FakeCounter(), SimpleNamespace(observe=lambda *a: None), SimpleNamespace(observe=lambda *a: None)
    m.record_pass(0.1, 4, images=4, padding=0)
    assert m.items.counts == {"images": 4}


def test_a_request_whose_caller_hung_up_is_recorded_without_egress():
    """No response body (client_closed): Ray's counters refuse an increment of 0, which turned the
    hang-up into a logged internal error before."""
    from serve_app.observability.metrics import RouterMetrics

    m = RouterMetrics()
    m.record("1", "/v1/embeddings", "embeddings", "client_closed", "validator", 0.1, 0, True, 1.0)
    m.flush()


def test_router_counters_are_added_up_and_handed_to_ray_once_per_flush():
    from serve_app.observability.metrics import RouterMetrics

    m = RouterMetrics()
    calls = []
    for name in ("requests", "egress", "tasks", "slo_requests", "slo_errors"):
        setattr(m, name, SimpleNamespace(inc=lambda value, tags, name=name: calls.append((name, value, tags))))
    for _ in range(3):
        m.record("1", "/v1/embeddings", "embeddings", "ok", "validator", 0.1, 100, True, 1.0)
    m.record("1", "/v1/embeddings", "embeddings", "deadline_exceeded", "validator", 2.0, 50, True, 1.0)
    assert calls == []  # nothing per request
    m.flush()
    assert sorted(calls, key=str) == sorted([
        ("requests", 3, {"netuid": "1", "route": "/v1/embeddings", "workload": "embeddings", "outcome": "ok",
                         "caller": "validator"}),
        ("requests", 1, {"netuid": "1", "route": "/v1/embeddings", "workload": "embeddings",
                         "outcome": "deadline_exceeded", "caller": "validator"}),
        ("egress", 350, {"netuid": "1", "route": "/v1/embeddings"}),
        ("tasks", 3, {"netuid": "1", "workload": "embeddings", "result": "accepted"}),
        ("tasks", 1, {"netuid": "1", "workload": "embeddings", "result": "failed"}),
        ("slo_requests", 4, {"netuid": "1", "slo": "availability"}),
        ("slo_requests", 3, {"netuid": "1", "slo": "latency"}),
        ("slo_errors", 1, {"netuid": "1", "slo": "availability"})], key=str)
    calls.clear()
    m.flush()
    assert calls == []  # each added once


class FakeEngine(GeneratingEngine):
    FREES = ("model",)

    def __init__(self, cfg, threads: int):
        self.model, self.device = object(), "cpu"
        self.built_on = threading.current_thread().name
        self.probes, self.closed = [], False

    def info(self) -> dict:
        return {"model": "fake", "device": self.device}

    def probe(self) -> None:
        self.probes.append(threading.current_thread().name)

    def generate(self, items: list) -> list:
        return [item * 2 for item in items]

    def close(self) -> None:
        super().close()
        self.closed = True


class FakeWorkload(WorkloadReplica):
    def __init__(self):
        cfg = SimpleNamespace(runtime=SimpleNamespace(cpu_nice=0, torch_threads=1, stuck_call_s=5.0),
                              placement=SimpleNamespace(num_cpus=1))
        super().__init__("fake", cfg, FakeEngine)
        self.runner = CoalescingRunner(self.engine_thread, self._pass, max_items=8)

    def _pass(self, items: list):
        outputs, _ = self.model_call(self.engine.generate, items)
        return (outputs,)


def test_the_engine_is_built_and_probed_on_its_thread_and_serves_through_a_runner():
    async def scenario():
        workload = FakeWorkload()
        try:
            (doubled,) = await workload.runner.run([1, 2])
            await workload.check_health()  # idle: a real probe
            return workload.engine, doubled, workload.info(), workload.record_autoscaling_stats()
        finally:
            workload.close()

    engine, doubled, info, stats = asyncio.run(scenario())
    assert engine.built_on.startswith("fake") and engine.probes == [engine.built_on]
    assert doubled == [2, 4] and info == {"model": "fake", "device": "cpu"} and stats["queued"] == 0


def test_a_call_running_past_stuck_call_s_fails_the_health_check_and_a_busy_one_is_not_probed():
    async def scenario():
        workload = FakeWorkload()
        try:
            workload.call_started = time.perf_counter() - 1  # busy, not stuck: no probe
            await workload.check_health()
            workload.call_started = time.perf_counter() - 6
            with pytest.raises(RuntimeError, match="a model call has run for over 5s"):
                await workload.check_health()
            return workload.engine.probes
        finally:
            workload.close()

    assert asyncio.run(scenario()) == []


def test_work_waiting_with_no_model_call_started_for_stuck_call_s_fails_the_health_check():
    """The engine thread held by something else (a hung GPU read) while work waits: no call runs,
    so neither the stuck-call check nor the idle probe would ever fire."""

    class Waiting(FakeWorkload):
        idle = False  # work queued

    async def scenario():
        workload = Waiting()
        try:
            workload.stuck_call_s = 0.05
            await workload.check_health()  # first seen waiting
            await asyncio.sleep(0.1)
            with pytest.raises(RuntimeError, match="work has waited 0s with no model call started"):
                await workload.check_health()
            workload.model_call(lambda: None)  # a call started since: waiting afresh
            await workload.check_health()
            return workload.engine.probes
        finally:
            workload.close()

    assert asyncio.run(scenario()) == []


def test_the_engine_is_closed_on_its_thread_after_the_call_running_there():
    async def scenario():
        workload = FakeWorkload()
        engine, order = workload.engine, []
        release = threading.Event()
        workload.engine_thread.run_sync(lambda: None)
        running = asyncio.get_running_loop().run_in_executor(None, workload.engine_thread.run_sync,
                                                             lambda: (release.wait(5), order.append("call")))
        await asyncio.sleep(0.05)
        closing = asyncio.get_running_loop().run_in_executor(None, workload.close)
        await asyncio.sleep(0.05)
        order.append(f"closed before the call ended: {engine.closed}")
        release.set()
        await running
        await closing
        return engine, order

    engine, order = asyncio.run(scenario())
    assert order == ["closed before the call ended: False", "call"] and engine.closed


def test_the_replica_stop_closes_the_engine_thread_and_loops():
    async def scenario():
        workload = FakeWorkload()
        engine, tasks = workload.engine, list(workload._background)
        workload.__del__()  # what Serve calls when it stops the replica
        await asyncio.sleep(0)
        workload.close()  # again: nothing more to do
        return workload, engine, tasks

    workload, engine, tasks = asyncio.run(scenario())
    assert engine.closed and "model" not in vars(engine) and workload.engine is None
    assert all(task.cancelled() for task in tasks)
    with pytest.raises(RuntimeError):  # the engine thread takes no more work
        workload.engine_thread.run_sync(print)


def test_gauges_are_in_flight_queued_the_workloads_own_and_no_gpu_on_cpu():
    published = []

    class Workload(FakeWorkload):
        def publish_workload_gauges(self):
            published.append("own")

    async def scenario():
        workload = Workload()
        try:
            workload.metrics.in_flight = SimpleNamespace(set=lambda value, tags: published.append(("in_flight", value)))
            workload.metrics.queued = SimpleNamespace(set=lambda value, tags: published.append(("queued", value)))
            workload.metrics.record_gpu = lambda usage: published.append("gpu")
            await workload._publish_gauges()
        finally:
            workload.close()

    asyncio.run(scenario())
    assert published == [("in_flight", 0), ("queued", 0), "own"]


class Unloadable(FakeEngine):
    def __init__(self, cfg, threads: int):
        raise OSError("no such model: /models/missing")


def fake_cfg():
    return SimpleNamespace(runtime=SimpleNamespace(cpu_nice=0, torch_threads=1, stuck_call_s=5.0),
                           placement=SimpleNamespace(num_cpus=1), model=SimpleNamespace(id="/models/missing"))


def test_a_candidate_whose_model_does_not_load_stays_up_and_fails_each_call_with_the_reason():
    with pytest.raises(OSError):  # a stable workload that cannot load fails its replica, as before
        WorkloadReplica("fake", fake_cfg(), Unloadable)

    class Candidate(WorkloadReplica):
        def __init__(self):
            super().__init__("fake", fake_cfg(), Unloadable, role="candidate")
            self.runner = CoalescingRunner(self.engine_thread, lambda items: None, max_items=8)

    async def scenario():
        workload = Candidate()
        try:
            await workload.check_health()  # healthy: Serve does not restart it in a loop
            with pytest.raises(RuntimeError, match="the candidate model did not load: OSError: no such model"):
                workload.model_call(workload.engine.generate, [1])
            return workload.info()
        finally:
            workload.close()

    info = asyncio.run(scenario())
    assert info["status"] == "failed_to_load" and info["weights_sha256"] == "not-loaded"


def test_a_retired_replica_frees_its_model_and_stays_healthy():
    async def scenario():
        workload = FakeWorkload()
        engine = workload.engine
        workload.reconfigure({})  # Serve's first call with no retirement: nothing happens
        assert workload.engine is engine and not workload.retired
        workload.reconfigure({"retired": True})
        await workload.check_health()
        return engine, workload

    engine, workload = asyncio.run(scenario())
    assert engine.closed and workload.engine is None and workload.info()["status"] == "retired"
