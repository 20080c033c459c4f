import asyncio
import time

import pytest
from starlette.requests import Request

from serve_app.errors import ApiError
from serve_app.router.body import BodyReads
from tests.unit.stepping import until


def request(chunks, headers=()):
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    taken = []

    async def receive():
        taken.append(1)
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(k.encode(), v.encode()) for k, v in headers]}
    return Request(scope, receive), taken


def test_declared_oversize_is_refused_before_reading():
    req, taken = request([b"x" * 10], headers=[("content-length", "5000")])
    with pytest.raises(ApiError) as err:
        asyncio.run(reads().read(req))
    assert (err.value.status, err.value.code) == (413, "body_too_large")
    assert taken == []


def test_undeclared_oversize_stops_at_the_limit():
    req, taken = request([b"x" * 600] * 10)
    with pytest.raises(ApiError) as err:
        asyncio.run(reads().read(req))
    assert err.value.status == 413
    assert len(taken) == 2  # stopped reading at the second chunk


def test_body_within_limit_and_bad_length_header():
    req, _ = request([b"ab", b"cd"])
    assert asyncio.run(reads().read(req)) == b"abcd"
    req, _ = request([b"ab"], headers=[("content-length", "-1")])
    with pytest.raises(ApiError) as err:
        asyncio.run(reads().read(req))
    assert err.value.status == 400


def reads(limit=8, timeout_s=5.0, grace_s=0.2, min_bytes_per_s=1000.0):
    return BodyReads(limit, 1024, timeout_s, grace_s, min_bytes_per_s)


def trickle(chunks, pause_s, headers=()):
    """A request whose body chunks arrive `pause_s` apart."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        if not messages:
            return {"type": "http.disconnect"}
        await asyncio.sleep(pause_s)
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(k.encode(), v.encode()) for k, v in headers]}
    return Request(scope, receive)


def test_a_body_slower_than_the_minimum_rate_is_cut_after_the_grace():
    async def run():
        started = time.monotonic()
        with pytest.raises(ApiError) as err:
            # Declared 1000 bytes at 1000 B/s after 0.2 s grace: it has 1.2 s, not the 5 s body timeout.
            await reads().read(trickle([b"x"] * 1000, 0.1, headers=[("content-length", "1000")]))
        return err.value, time.monotonic() - started

    err, took = asyncio.run(run())
    assert (err.status, err.code) == (408, "body_timeout") and took < 2


def test_an_undeclared_trickle_is_cut_at_the_rate_too():
    async def run():
        with pytest.raises(ApiError) as err:
            await reads().read(trickle([b"x"] * 100, 0.1))  # 10 B/s, no Content-Length
        return err.value

    err = asyncio.run(run())
    assert (err.status, err.code) == (408, "body_timeout") and "slower than" in err.detail


def test_when_the_budget_is_full_the_slowest_read_is_cut_and_the_newcomer_is_read():
    async def run():
        budget = reads(limit=3, grace_s=30, min_bytes_per_s=10)
        # Three bodies: 1 byte per 5 s (behind the rate), 20 bytes/s (ahead of it), 1 byte per 5 s.
        slow = [asyncio.ensure_future(budget.read(trickle([b"x"] * n, pause)))
                for n, pause in ((10, 5), (200, 0.05), (10, 5))]
        await asyncio.sleep(1.0)  # the two behind are now 0.9 s behind the rate
        body = await budget.read(request([b'{"input": "hi"}'])[0])  # a validator's body: with its headers
        # A bad Content-Length is refused before it can cut anyone.
        with pytest.raises(ApiError):
            await budget.read(request([b"x"], headers=[("content-length", "x")])[0])
        await asyncio.sleep(0)
        outcomes = []
        for task in slow:
            try:
                outcomes.append(await asyncio.wait_for(task, 0.05))
            except ApiError as err:
                outcomes.append((err.status, err.code))
            except asyncio.TimeoutError:
                outcomes.append("still reading")
        return body, outcomes, budget

    body, outcomes, budget = asyncio.run(run())
    assert body == b'{"input": "hi"}'
    assert outcomes == [(408, "body_timeout"), "still reading", "still reading"]
    assert budget.cut_total == 1 and len(budget.reading) == 0


BODY = {"type": "http.request", "body": b'{"input": "hi"}', "more_body": False}


@pytest.mark.parametrize("case", ["read in full", "held whole by HAProxy"])
def test_when_every_read_has_its_whole_body_the_newcomer_is_shed_and_none_is_cut(case):
    # A busy router's reads of bodies it has whole are never a slow client's to cut: bodies read in
    # full whose end it has not handed on yet, and (under overload, the router getting to its reads
    # only later) bodies of which it has read nothing yet but HAProxy says it held them whole.
    async def run():
        budget = reads(limit=2, grace_s=5, min_bytes_per_s=10)
        gate = asyncio.Event()  # the router has not got further with these reads yet
        headers = [(b"content-length", b"15")]
        if case == "read in full":
            before, after = [dict(BODY, more_body=True)], dict(BODY, body=b"")
        else:
            before, after = [], BODY
            headers.append((b"x-torchrank-body-whole", b"1"))

        def whole():
            chunks = iter(before)

            async def receive():
                try:
                    return next(chunks)
                except StopIteration:
                    await gate.wait()
                    return after

            return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)

        held = [asyncio.ensure_future(budget.read(whole())) for _ in range(2)]
        await until(lambda: len(budget.reading) == 2 and all(p[1] == 15 * len(before) for p in budget.reading.values()))
        with pytest.raises(ApiError) as refused:
            await budget.read(request([b'{"input": "hi"}'])[0])
        gate.set()
        assert [await h for h in held] == [b'{"input": "hi"}'] * 2
        return refused.value, budget

    err, budget = asyncio.run(run())
    assert (err.status, err.code) == (503, "shed") and budget.cut_total == 0


def test_a_router_lagging_behind_its_loop_does_not_take_its_lag_for_a_slow_body():
    # Under overload the router reads a body that came whole (HAProxy buffers small ones) late:
    # that is the router's lag, not the client's rate.
    async def receive():
        time.sleep(1.5)  # the event loop was busy elsewhere before it got to this body
        return {"type": "http.request", "body": b"x" * 1000, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"1000")]}
    body = asyncio.run(reads(grace_s=0.2, min_bytes_per_s=1000).read(Request(scope, receive)))
    assert body == b"x" * 1000


def test_a_body_timeout_while_the_router_lags_is_a_shed_not_the_clients_408():
    async def busy_loop():
        await asyncio.sleep(0.05)
        time.sleep(1.2)  # the router's event loop falls behind (overload)

    async def run():
        lag = asyncio.ensure_future(busy_loop())
        with pytest.raises(ApiError) as err:
            await reads(timeout_s=0.2).read(trickle([b"x"] * 10, 5))
        await lag
        return err.value

    err = asyncio.run(run())
    assert (err.status, err.code) == (503, "shed")


def test_a_body_relay_cancelled_by_serves_proxy_is_the_client_going_away():
    # Seen under overload: the proxy's relay of the body is cancelled once its client leaves;
    # it surfaced as a 500 internal_error.
    from ray.exceptions import TaskCancelledError

    async def receive():
        raise TaskCancelledError("relay task")

    req = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
    with pytest.raises(ApiError) as err:
        asyncio.run(reads().read(req))
    assert (err.value.status, err.value.code) == (400, "client_disconnected")
