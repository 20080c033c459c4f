"""Sends the simulated validators' requests: open loop at the arrival times, each signed as its
validator signs (the subnet's scheme, with or without the receiver), with its own deadline in
X-Bittensor-Timeout (an answer after it scores 0; the validator listens LATE_GRACE_S longer, to
tell a late answer from none), and retried after a 429 or 503 by those that retry
(after Retry-After, at most MAX_RETRY_DELAY_S). Faults (benchmarks/soak.py, the serve test) run
in a thread at their time; each records the window from its start until its `end` returns.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import orjson

from serve_app.client import error_code, signed_request
from serve_app.simulate.arrivals import pick
from serve_app.simulate.payloads import Payloads, Work
from serve_app.simulate.population import MAX_RETRY_DELAY_S, Validator
from serve_app.simulate.scoring import Attempt

RETRIED = (429, 503)
# A validator keeps listening this long past its deadline, to tell an answer that came a little
# late (it scores 0 all the same) from none at all (work the miner dropped).
LATE_GRACE_S = 1.0


@dataclass(frozen=True)
class Fault:
    at_s: float  # into the run
    name: str
    start: Callable[[], None]  # run in a thread
    end: Optional[Callable[[], None]] = None  # after duration_s, in a thread: restore, or wait for recovery
    duration_s: float = 0.0


class Simulation:
    def __init__(self, url: str, receiver: str, scheme: str, validators: Sequence[Validator], payloads: Payloads,
                 seed: int = 0):
        self.url = url.rstrip("/")
        self.receiver = receiver
        self.scheme = scheme
        self.validators = list(validators)
        self.payloads = payloads
        self.rng = random.Random(seed)
        self.attempts: list[Attempt] = []
        self.windows: list[dict] = []
        self._tasks = 0

    def assign(self, count: int) -> list[tuple[int, str]]:
        """(validator, kind) for each of `count` arrivals: by share, then by the validator's mix."""
        shares = {i: v.share for i, v in enumerate(self.validators)}
        out = []
        for _ in range(count):
            i = pick(self.rng, shares)
            out.append((i, pick(self.rng, self.validators[i].mix)))
        return out

    async def run(self, arrivals: Sequence[float], faults: Sequence[Fault] = ()) -> list[Attempt]:
        import aiohttp

        plan = self.assign(len(arrivals))
        # No pool limit: each validator has connections of its own, and a wait for a pooled one would
        # be charged to the miner's latency.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
            t0 = time.perf_counter()
            fault_tasks = [asyncio.create_task(self._fault(f, t0)) for f in faults]
            sending = []
            for at, (i, kind) in zip(arrivals, plan):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                work = self.payloads.make(i, kind, self.rng)
                sending.append(asyncio.create_task(self._task(client, i, self._next_task(), work)))
            await asyncio.gather(*sending, *fault_tasks)
        return self.attempts

    def _next_task(self) -> int:
        self._tasks += 1
        return self._tasks

    async def _fault(self, fault: Fault, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + fault.at_s - time.perf_counter()))
        start = time.time()
        await asyncio.to_thread(fault.start)
        await asyncio.sleep(max(0.0, start + fault.duration_s - time.time()))
        if fault.end is not None:
            await asyncio.to_thread(fault.end)
        self.windows.append({"name": fault.name, "start": start, "end": time.time()})

    async def _task(self, client, i: int, task: int, work: Work) -> None:
        v = self.validators[i]
        for attempt in range(v.retries + 1):
            a, retry_after = await self._send(client, i, task, attempt, work)
            self.attempts.append(a)
            if a.status not in RETRIED or attempt == v.retries:
                return
            await asyncio.sleep(min(MAX_RETRY_DELAY_S, retry_after if retry_after is not None else v.retry_delay_s))

    async def _send(self, client, i: int, task: int, attempt: int, work: Work) -> tuple[Attempt, Optional[float]]:
        import aiohttp

        v = self.validators[i]
        body, headers = signed_request(v.signer, work.path, work.payload, self.receiver if v.receiver else None,
                                       self.scheme)
        headers["X-Bittensor-Timeout"] = f"{v.timeout_s:g}"
        sent, started = time.time(), time.perf_counter()
        status, raw, retry_after = 0, b"", None
        error = ""
        try:
            async with client.post(self.url + work.path, data=body, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=v.timeout_s + LATE_GRACE_S)) as resp:
                status, raw = resp.status, await resp.read()
                retry_after = _seconds(resp.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            error = "TimeoutError"  # no answer, even a little past the validator's deadline
        except (aiohttp.ClientError, OSError) as exc:
            error = type(exc).__name__
        seconds = time.perf_counter() - started
        a = Attempt(validator=i, kind=work.kind, task=task, attempt=attempt, sent_at=sent, seconds=seconds,
                    status=status, error=error)
        if status == 200:
            a.correct, a.note, a.unanswered = judge(work, raw)
        elif status:
            a.error = error_code(status, raw)
        return a, retry_after


def judge(work: Work, raw: bytes) -> tuple[bool, str, bool]:
    """(correct, why not, an agent run without an answer) for a 200's body; an answer of any
    shape is judged, never raised on."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False, "200 with a body that is not JSON", False
    if not isinstance(data, dict):
        return False, "200 with a body that is not a JSON object", False
    try:
        correct, note = work.check(data)
    except Exception as exc:  # a field of another type than the protocol's, deep inside
        correct, note = False, f"an answer of another shape than the protocol's ({type(exc).__name__})"
    return correct, note if not correct else "", work.kind == "agents" and data.get("answer") is None


def _seconds(value: Optional[str]) -> Optional[float]:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
