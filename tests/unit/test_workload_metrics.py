"""GPU gauges: set per device where CUDA is present, never set (absent) on CPU; item counts."""

from types import SimpleNamespace

from serve_app.engines.gpu import gpu_usage
from serve_app.observability.metrics import WorkloadMetrics


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

    RouterMetrics().record("1", "/v1/embeddings", "embeddings", "client_closed", "validator", 0.1, 0, True, 1.0)
