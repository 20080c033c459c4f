"""Signed load against a miner, as validators make it: open loop (a fixed arrival rate, the
way overload really arrives) or closed loop (N callers, each waiting for its answer).

Test and benchmark tooling, not part of the miner: the reliability tests and the benchmarks
use it. Every request is signed fresh, just before it is sent, so nonces never go stale
however long the run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Optional

import aiohttp

from serve_app.client import error_code, signed_request
from serve_app.errors import REFUSALS
from serve_app.simulate.scoring import percentile

# (path, payload) for request number i.
MakeRequest = Callable[[int], tuple[str, object]]
# Fast refusals of load (the validator may send the work elsewhere at once) are counted apart;
# anything else >= 500, or no answer at all, is a failure.


@dataclass(frozen=True)
class Outcome:
    sent_at: float  # seconds since the run started
    seconds: float
    status: int  # 0: no HTTP answer (connection error or the client's own timeout)
    error: str  # the JSON error code, "" for 200, the exception's name without an answer


class Load:
    def __init__(self, url: str, signer, receiver_ss58: str, make: MakeRequest, timeout_s: float = 10.0,
                 headers: Optional[dict[str, str]] = None, scheme: str = "btauth", local_addr: Optional[str] = None):
        self.url = url
        self.scheme = scheme  # the subnet's auth.scheme
        self.signer = signer
        self.receiver = receiver_ss58
        self.make = make
        self.timeout_s = timeout_s
        self.headers = headers or {}
        self.local_addr = local_addr  # the source address (a validator apart from a flood: 127.0.0.2)
        self.outcomes: list[Outcome] = []
        self._count = 0
        self._signed: list[tuple[str, bytes, dict]] = []

    def presign(self, count: int) -> "Load":
        """Sign the first `count` requests now, so that signing them does not compete with the
        miner for CPU during the run (validators sign on their own machines). They must be
        sent within the subnet's auth max_age_s."""
        self._signed = [(path, *signed_request(self.signer, path, payload, self.receiver, self.scheme))
                        for path, payload in map(self.make, range(count))]
        return self

    async def _one(self, client: aiohttp.ClientSession, t0: float) -> None:
        i, self._count = self._count, self._count + 1
        if i < len(self._signed):
            path, body, headers = self._signed[i]
        else:
            path, payload = self.make(i)
            body, headers = signed_request(self.signer, path, payload, self.receiver, self.scheme)
        sent = time.perf_counter()
        try:
            async with client.post(self.url + path, data=body, headers={**headers, **self.headers}) as resp:
                status, answer = resp.status, await resp.read()
            error = "" if status == 200 else error_code(status, answer)
        except Exception as exc:  # the client gave up or the connection broke: that is a lost request
            status, error = 0, type(exc).__name__
        self.outcomes.append(Outcome(sent - t0, time.perf_counter() - sent, status, error))

    def _client(self, connections: int) -> aiohttp.ClientSession:
        # aiohttp: a fraction of httpx's CPU per request, so the load generator is not the bottleneck.
        # A little over the deadline: a request that outlives it counts as hung, not as answered.
        local = (self.local_addr, 0) if self.local_addr else None
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections, local_addr=local),
                                     timeout=aiohttp.ClientTimeout(total=self.timeout_s + 5))

    async def open_loop(self, rate: float, seconds: float, connections: int = 512) -> list[Outcome]:
        """`rate` requests/s for `seconds`, whether or not the miner keeps up."""
        async with self._client(connections) as client:
            t0 = time.perf_counter()
            tasks, n = [], int(rate * seconds)
            for i in range(n):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self._one(client, t0)))
            await asyncio.gather(*tasks)
        return self.outcomes

    async def closed_loop(self, concurrency: int, seconds: float, during: Optional[Callable] = None,
                          at_s: float = 0.0, until_during: bool = False) -> list[Outcome]:
        """`concurrency` callers for `seconds`; `during()` (a fault, or checks made under load)
        runs once, `at_s` in. With `until_during` the load stops once `during()` has returned
        (or raised), `seconds` at most."""
        async with self._client(concurrency) as client:
            t0 = time.perf_counter()
            end = t0 + seconds
            done = asyncio.Event()

            async def caller():
                while time.perf_counter() < end and not done.is_set():
                    await self._one(client, t0)

            async def fault():
                await asyncio.sleep(at_s)
                try:
                    await asyncio.to_thread(during)
                finally:
                    if until_during:
                        done.set()

            await asyncio.gather(*(caller() for _ in range(concurrency)), *([fault()] if during else []))
        return self.outcomes


def summary(outcomes: list[Outcome], seconds: float) -> dict:
    ok = [o.seconds for o in outcomes if o.status == 200]
    refused = [o.seconds for o in outcomes if o.error in REFUSALS]
    by_status: dict[str, int] = {}
    for o in outcomes:
        key = f"{o.status} {o.error}".strip()
        by_status[key] = by_status.get(key, 0) + 1
    return {
        "sent": len(outcomes),
        "offered_rps": round(len(outcomes) / seconds, 1),
        "ok": len(ok),
        "ok_rps": round(len(ok) / seconds, 1),
        "refused": len(refused),
        "failed": sum(1 for o in outcomes if failed(o)),
        "ok_p50_ms": _ms(percentile(ok, 0.5)),
        "ok_p99_ms": _ms(percentile(ok, 0.99)),
        "refused_p50_ms": _ms(percentile(refused, 0.5)),
        "refused_p99_ms": _ms(percentile(refused, 0.99)),
        "by_status": dict(sorted(by_status.items())),
    }


def failed(o: Outcome) -> bool:
    return o.status == 0 or (o.status >= 500 and o.error not in REFUSALS)


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 1)
