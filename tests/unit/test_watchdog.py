import pytest

from serve_app.config import SubnetConfig
from serve_app.errors import ApiError
from serve_app.ops.hysteresis import Hysteresis
from serve_app.ops.watchdog import SubnetWatchdog
from serve_app.router.policy import priority, request_timeout


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def subnet(**kw):
    return SubnetConfig(netuid=1, metagraph={"source": "snapshot", "path": "x"}, **kw)


def test_watchdog_names_each_reason_and_forgets_old_samples():
    clock = Clock()
    dog = SubnetWatchdog(subnet(slo={"latency_s": 0.5},
                                watchdog={"window_s": 10, "min_requests": 10, "max_error_rate": 0.1,
                                          "max_metagraph_age_s": 60}), clock=clock)
    assert dog.verdict(5.0) == []
    for i in range(20):
        dog.observe(0.9 if i % 2 else 0.1, failed=i < 5)
    reasons = dog.verdict(120.0)
    assert any("metagraph" in r for r in reasons)
    assert any("p95" in r for r in reasons)
    assert any("5 of 20" in r for r in reasons)
    assert dog.verdict(None) == ["no metagraph loaded"] + reasons[1:]
    clock.now += 11
    assert dog.verdict(1.0) == []


def test_hysteresis_switches_only_on_sustained_change():
    clock = Clock()
    h = Hysteresis(on_after_s=5, off_after_s=10, clock=clock)
    assert not h.update(True)
    clock.now = 3
    assert not h.update(False)  # a burst: the timer resets
    clock.now = 4
    h.update(True)
    clock.now = 9
    assert h.update(True)
    clock.now = 15
    assert h.update(False)
    clock.now = 25
    assert not h.update(False)


def test_request_timeout_header():
    s = subnet(timeout_s=12, max_timeout_s=30)
    assert request_timeout({}, s) == 12
    assert request_timeout({"X-Bittensor-Timeout": "2.5"}, s) == 2.5
    assert request_timeout({"X-Bittensor-Timeout": "600"}, s) == 30
    for bad in ["0", "-1", "nan", "inf", "soon"]:
        with pytest.raises(ApiError) as err:
            request_timeout({"X-Bittensor-Timeout": bad}, s)
        assert (err.value.status, err.value.code) == (422, "invalid_timeout")


def test_priority_is_stake_and_allow_listed_go_first():
    from serve_app.chain.metagraph import MetagraphView, Neuron
    from serve_app.config import AuthPolicy

    v = MetagraphView(1, 1, {"a": Neuron(0, "a", 42.0, True)})
    policy = AuthPolicy(allow_hotkeys=("ops",))
    assert priority("a", v, policy) == 42.0
    assert priority("ops", v, policy) == float("inf")
    assert priority("stranger", v, policy) == 0.0
