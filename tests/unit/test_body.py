import asyncio

import pytest
from starlette.requests import Request

from serve_app.errors import ApiError
from serve_app.router.body import read_capped


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
        asyncio.run(read_capped(req, 1024, 5))
    assert (err.value.status, err.value.code) == (413, "body_too_large")
    assert taken == []


def test_undeclared_oversize_stops_at_the_limit():
    req, taken = request([b"x" * 600] * 10)
    with pytest.raises(ApiError) as err:
        asyncio.run(read_capped(req, 1024, 5))
    assert err.value.status == 413
    assert len(taken) == 2  # stopped reading at the second chunk


def test_body_within_limit_and_bad_length_header():
    req, _ = request([b"ab", b"cd"])
    assert asyncio.run(read_capped(req, 1024, 5)) == b"abcd"
    req, _ = request([b"ab"], headers=[("content-length", "-1")])
    with pytest.raises(ApiError) as err:
        asyncio.run(read_capped(req, 1024, 5))
    assert err.value.status == 400
