from serve_app.chain.metagraph import MetagraphView, Neuron
from serve_app.config import RateLimitConfig
from serve_app.ops.ratelimit import RateLimiter


def view():
    neurons = {
        "big": Neuron(0, "big", 900.0, True),
        "small": Neuron(1, "small", 100.0, True),
        "miner": Neuron(2, "miner", 5000.0, False),  # no permit: not in the validator stake
    }
    return MetagraphView(netuid=1, block=1, neurons=neurons)


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_rate_follows_stake_share_with_a_floor_and_overrides():
    limiter = RateLimiter(RateLimitConfig(total_rps=100, floor_rps=5, overrides={"vip": 1.0}), replicas=2)
    v = view()
    assert limiter.rate("big", v, False) == 45.0  # 90 % of 100, split over 2 replicas
    assert limiter.rate("small", v, False) == 5.0
    assert limiter.rate("nobody", v, False) == 2.5  # the floor
    assert limiter.rate("allowed", v, True) is None
    assert limiter.rate("vip", v, True) == 0.5


def test_bucket_refuses_past_the_burst_and_says_when_to_retry():
    clock = Clock()
    limiter = RateLimiter(RateLimitConfig(total_rps=10, floor_rps=0, burst_s=1), clock=clock)
    v = view()  # small: 10 % of 10 = 1 request/s, burst 1
    assert limiter.check("small", v) is None
    wait = limiter.check("small", v)
    assert wait is not None and 0.9 < wait <= 1.0
    clock.now += 1.0
    assert limiter.check("small", v) is None
    for _ in range(9):  # big: 9/s, burst 9
        assert limiter.check("big", v) is None
    assert limiter.check("big", v) is not None


def test_zero_rate_is_refused_without_dividing_by_zero():
    limiter = RateLimiter(RateLimitConfig(total_rps=10, floor_rps=0))
    assert limiter.check("nobody", view()) == float("inf")
