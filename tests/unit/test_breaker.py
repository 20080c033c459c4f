from serve_app.config import BreakerConfig
from serve_app.ops.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def breaker(**kw):
    clock = Clock()
    return CircuitBreaker(BreakerConfig(**kw), clock=clock), clock


def test_opens_after_consecutive_failures_and_fails_fast():
    b, _ = breaker(consecutive_failures=3)
    for _ in range(2):
        assert b.allow()
        b.record(True)
    b.record(False)  # a success resets the run
    for _ in range(3):
        b.record(True)
    assert b.state == OPEN and not b.allow()
    assert 0 < b.retry_after_s() <= 5


def test_opens_on_failure_rate_over_the_window():
    b, clock = breaker(consecutive_failures=100, failure_rate=0.5, min_calls=10, window_s=10)
    for i in range(9):
        b.record(i % 2 == 0)  # 5 of 9 failed, under min_calls
    assert b.state == CLOSED
    b.record(True)  # 6 of 10
    assert b.state == OPEN


def test_old_calls_leave_the_window():
    b, clock = breaker(consecutive_failures=100, failure_rate=0.5, min_calls=4, window_s=10)
    for _ in range(3):
        b.record(True)
    clock.now += 11
    for _ in range(3):
        b.record(False)
    b.record(True)  # 1 of 4 in the window
    assert b.state == CLOSED


def test_half_open_probe_closes_or_reopens():
    b, clock = breaker(consecutive_failures=1, open_s=5, half_open_probes=1)
    b.record(True)
    clock.now += 5
    assert b.state == HALF_OPEN
    assert b.allow() and not b.allow()  # one probe at a time
    b.record(True)
    assert b.state == OPEN and b.times_opened == 2
    clock.now += 5
    assert b.allow()
    b.record(False)
    assert b.state == CLOSED and b.allow() and b.allow()


def test_abandoned_probe_frees_its_place():
    b, clock = breaker(consecutive_failures=1, open_s=1)
    b.record(True)
    clock.now += 1
    assert b.allow()
    b.abandon()
    assert b.allow()
    assert b.snapshot()["state"] == HALF_OPEN
