"""The request path of the subnet axon, as a plain class: no Serve, no FastAPI state. The
Router deployment (serve_app/router/deployment.py) hands it each request.

In order; a request refused at any step stops there and never reaches a workload:
  route (404; 405 unless POST) -> the entry gate, before any work on it (503 shed)
  -> JSON content type (415) -> deadline from X-Bittensor-Timeout (422), counted from HAProxy's arrival stamp
  -> the scheme's auth headers, each exactly once (401) -> authorisation of the claimed hotkey
     from the subnet's metagraph (403, or 503 without a usable metagraph) -> early shed by the
     claimed hotkey's stake when admission could not finish it in time (503 shed)
     (none of these reads the body or does signature work)
  -> body under the cap, at the minimum rate, among the body reads (413, 408)
  -> signature under the subnet's scheme, btauth/1 or Epistula v2 (401)
  -> shared replay check (401, 503); the caller's address is then trusted at the edge
  -> per-hotkey rate limit (429) -> schema and limits (422)
  -> circuit breaker (503) -> admission by deadline and stake (503 shed, 504) -> workload call
     under the deadline, once more on another replica if one died mid-call (503, 504); with a
     rollout, on the side it picks (serve_app/router/rollouts.py)
  -> the answer, encoded; then the outcome is recorded (metrics, watchdog, log line).
A streamed answer (an agent run with "stream": true) is Server-Sent Events: the refusals
above stay JSON errors; once admitted, the response starts and the run's slot, breaker
verdict and record last until its final event, or until the caller hangs up (the run is
cancelled). Codes: serve_app/errors.py.
With HAProxy in front, the checks that need no signature (404, 405, 401 headers, 403, rates,
shedding by stake tier) are made first at the edge (deployments/haproxy/edge.cfg, fed by
serve_app/router/edge.py); the router makes them again, so the edge only takes load off it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Mapping, Optional

import ray
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse


from serve_app.contracts import DeadlinePassed
from serve_app.errors import (ApiError, ErrorCode, deadline_exceeded, error_response, json_response, not_found,
                              retry_after, shed, sse_event, unavailable)
from serve_app.ops.admission import QueueDeadline, Shed
from serve_app.ops.breaker import OPEN
from serve_app.router.body import check_content_type
from serve_app.router.policy import authorise, caller_class, priority, request_timeout, waited_s
from serve_app.router.routes import Route

log = logging.getLogger("ray.serve.torchrank.router")
# A claimed nonce may be taken over from a dead router this long past the longest deadline.
CLAIM_MARGIN_S = 5.0
# A replica that died mid-call: try another this many times (idempotent workloads only).
DEAD_REPLICA_RETRIES = 2
RETRY_BACKOFF_S = 0.05  # doubled per attempt, with full jitter
# Workload errors that mean "this replica is gone", not "this request is bad".
REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
# The caller's address as HAProxy saw it (deployments/haproxy/edge.cfg sets it, replacing any sent).
CLIENT_HEADER = "x-torchrank-client"
RECEIVED_HEADER = "x-torchrank-received"  # set by HAProxy (edge.cfg): see policy.waited_s


def signed_target(request: Request) -> str:
    """The request target exactly as the client sent it (path and query): what btauth/1 signs
    (Epistula signs neither the method nor the path)."""
    scope = request.scope
    target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    query = scope.get("query_string") or b""
    return f"{target}?{query.decode('latin-1')}" if query else target


def breaker_open(workload: str, breaker) -> ApiError:
    return ApiError(ErrorCode.breaker_open, f"the {workload} workload is failing; refusing fast while it recovers",
                    retry_after(breaker.retry_after_s()))


def breaker_probing(workload: str) -> ApiError:
    """Half-open, and its probe is already out."""
    return ApiError(ErrorCode.breaker_open, f"the {workload} workload is being probed after failures", retry_after(1))


class NoEdge:
    """No HAProxy in front (unit tests, a plain `serve run`): nothing to tell."""

    def trust(self, address: Optional[str]) -> None:
        pass

    def offered(self, path: str, priority: float, shed: bool) -> None:
        pass


@dataclass
class Ended:
    """How one request ended: what the router records (metrics, watchdog, log line). Never the
    body, signature or headers."""

    path: str
    route: Optional[Route] = None
    caller: str = "-"  # the hotkey, once its signature verified
    who: str = "unauthenticated"  # caller_class: a bounded label
    outcome: str = ErrorCode.internal_error.value  # "ok" or the error code
    status: int = 500
    admitted: bool = False  # passed authentication, authorisation and validation: counts for the SLOs
    seconds: float = 0.0
    response_bytes: int = 0


class EventStream:
    """An admitted streamed answer: `events` yields its SSE bytes; `close` (once, whether or not
    the events were read: a caller may hang up before the first) cancels the run, gives the
    breaker its verdict, frees the slot and records the request. `outcome`: "ok" or the error code."""

    def __init__(self):
        self.outcome = "ok"
        self.verdict: Optional[bool] = True  # for the breaker: failed, unless shown otherwise; None: no verdict
        self.events: Optional[AsyncIterator[bytes]] = None
        self._cleanups: list[Callable] = []
        self._closed = False

    def on_close(self, fn: Callable) -> None:
        """`fn()` (a coroutine function or a plain one) at close, after those added later."""
        self._cleanups.append(fn)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fn in reversed(self._cleanups):
            try:
                result = fn()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("closing a streamed answer failed")


class _EventStreamResponse(StreamingResponse):
    def __init__(self, stream: EventStream, headers: dict):
        self.stream = stream

        async def body():
            try:
                async for chunk in stream.events:
                    yield chunk
            except (asyncio.CancelledError, GeneratorExit):
                if stream.outcome == "ok":
                    stream.outcome = ErrorCode.client_closed.value
                stream.verdict = None
                raise

        # No proxy buffering (nginx and the like): each step reaches the validator as it ends.
        super().__init__(body(), media_type="text/event-stream",
                         headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except BaseException:
            if self.stream.outcome == "ok":  # not every event went out
                self.stream.outcome = ErrorCode.client_closed.value
                self.stream.verdict = None
            raise
        finally:
            await self.stream.close()


class RequestPipeline:
    """`handle(request, request_id)` -> the response, always (refusals are JSON errors).

    `routes`: full path -> Route. `auth`: the Authenticator (verify, claim, settle).
    `body_reads`: the BodyReads budget. `workload_ready`: workload -> answers its readiness
    probe (read, not owned). `record`: called once per request with its Ended. `clock`:
    monotonic seconds, the base of admission's deadlines."""

    def __init__(self, routes: Mapping[str, Route], auth, body_reads, *, max_in_progress: int,
                 workload_ready: Mapping[str, bool], record: Callable[[Ended], None],
                 clock: Callable[[], float] = time.monotonic, replica: str = "local",
                 edge=None):
        self.routes = routes
        self.auth = auth
        self.body_reads = body_reads
        self.max_in_progress = max_in_progress
        self.workload_ready = workload_ready
        self.record = record
        # The edge's view of this router (EdgeKeeper): the addresses of verified requests, and how much
        # of each route's and stake tier's work admission took or shed.
        self.edge = edge or NoEdge()
        self.clock = clock
        self.headers = {"X-Miner-Replica": replica}
        self.in_progress = 0  # all routes: the entry gate's count
        self.in_flight = {route.subnet.netuid: 0 for route in routes.values()}

    async def handle(self, request: Request, request_id: str = "-") -> Response:
        started = self.clock()
        route = self.routes.get(request.url.path)
        ended = Ended(path=request.url.path, route=route)
        response = None
        self.in_progress += 1
        if route is not None:
            self.in_flight[route.subnet.netuid] += 1
        streamed = False
        try:
            result = await self._answer(request, route, ended)
            if isinstance(result, EventStream):
                response = self._streaming_response(result, ended, route, started)
                streamed = True  # counted and recorded when the stream ends
                return response
            response = json_response(result, headers=self.headers)
            ended.outcome, ended.status = "ok", 200  # only once the answer is encoded
        except ApiError as err:
            ended.outcome, ended.status = err.code.value, err.status
            response = error_response(err, self.headers)
        except asyncio.CancelledError:
            # The caller went away (or Serve cancelled the request): not the miner's failure.
            ended.outcome, ended.status = ErrorCode.client_closed.value, ErrorCode.client_closed.status
            raise
        except Exception:
            log.exception("request %s failed inside the miner", request_id)
            response = error_response(ApiError(ErrorCode.internal_error,
                                               f"the miner failed this request (id {request_id})"), self.headers)
        finally:
            if not streamed:
                self._end(ended, route, started, len(response.body) if response is not None else 0)
        return response

    def _end(self, ended: Ended, route: Optional[Route], started: float, response_bytes: int) -> None:
        self.in_progress -= 1
        if route is not None:
            self.in_flight[route.subnet.netuid] -= 1
        ended.seconds = self.clock() - started
        ended.response_bytes = response_bytes
        self.record(ended)

    def _streaming_response(self, stream: EventStream, ended: Ended, route: Route, started: float) -> Response:
        def end():
            ended.outcome = stream.outcome
            ended.status = 200 if stream.outcome == "ok" else ErrorCode[stream.outcome].status
            self._end(ended, route, started, 0)

        stream.on_close(end)  # first added: runs last, once the slot is free
        return _EventStreamResponse(stream, self.headers)

    async def _answer(self, request: Request, route: Optional[Route], ended: Ended) -> dict:
        """The steps of the module docstring, in order."""
        if route is None:
            raise not_found(request.url.path)
        if request.method != "POST":
            raise ApiError(ErrorCode.method_not_allowed, f"{route.path} accepts POST", {"Allow": "POST"})
        if self.in_progress > self.max_in_progress:
            # Before any work on it (body, signature, replay store): past this point even
            # refusing costs CPU the admitted requests need.
            raise shed("the miner is at capacity", retry_after_s=1)
        check_content_type(request.headers.get("content-type"))
        timeout = request_timeout(request.headers, route.subnet)
        deadline = self.clock() + timeout - waited_s(request.headers.get(RECEIVED_HEADER), time.time(), timeout)
        view, policy = route.metagraph.view, route.subnet.auth
        # Not verified yet: only used to refuse (401 without the scheme's headers, each once).
        claimed = self.auth.claimed_hotkey(request.headers, policy)
        # Before the body, the signature and the replay store: a stranger's key costs none of them.
        try:
            authorise(claimed, view, policy)
        except ApiError:
            ended.who = caller_class(claimed, view, policy)
            raise
        if route.admission.would_shed(prio := priority(claimed, view, policy), deadline):
            self.edge.offered(route.path, prio, shed=True)
            raise shed(f"the {route.adapter.workload} workload is at capacity", retry_after_s=1)
        body = await self.body_reads.read(request)
        view = route.metagraph.view  # a refresh may have landed while the body arrived
        signed = self.auth.verify(request.headers, body, method=request.method, path=signed_target(request),
                                  policy=policy)
        ended.caller = caller = signed.hotkey  # the signature proves the caller holds it
        ended.who = caller_class(caller, view, policy)
        if caller != claimed:
            authorise(caller, view, policy)
        await self.auth.claim(signed, max_open_s=route.subnet.max_timeout_s + CLAIM_MARGIN_S)
        # Signed, authorised and fresh (a replay is refused above): the address it came from is a
        # validator's, which the edge stops counting as a stranger's.
        self.edge.trust(request.headers.get(CLIENT_HEADER))
        try:
            if route.subnet.rate_limit.enabled:
                wait = route.rate_limit.check(caller, view, allow_listed=caller in policy.allow_hotkeys)
                if wait is not None:
                    raise ApiError(ErrorCode.rate_limited, "this hotkey is over its request rate; see Retry-After",
                                   retry_after(min(wait, 3600)))
            parsed = route.adapter.parse(body)
            ended.admitted = True
            return await self._admit_and_call(route, parsed, priority(caller, view, policy), deadline, timeout, caller)
        finally:
            self.auth.settle(signed)  # answered, whatever the answer: its nonce can no longer be taken over

    async def _admit_and_call(self, route: Route, parsed, prio: float, deadline: float, timeout: float,
                              caller: str) -> dict:
        """Breaker, then a slot by deadline and stake, then the call; the breaker hears how the call went."""
        breaker, workload = route.breaker, route.adapter.workload
        if getattr(route.adapter, "streams", None) and route.adapter.streams(parsed):
            return await self._open_stream(route, parsed, prio, deadline, timeout)
        if breaker.state == OPEN:  # fail fast, before queueing
            raise breaker_open(workload, breaker)
        try:
            async with route.admission.slot(prio, deadline, route.adapter.cost(parsed)):
                self.edge.offered(route.path, prio, shed=False)
                if not breaker.allow():
                    raise breaker_probing(workload)
                verdict = True  # failed, unless shown otherwise
                try:
                    if route.rollout is None:
                        result = await self._call_workload(route, route.workload, parsed, deadline, timeout)
                    else:  # the rollout picks the side (and falls back to stable when the candidate fails)
                        result = await route.rollout.serve(caller, deadline, lambda handle, until: self._call_workload(
                            route, handle, parsed, until, timeout))
                    verdict = False
                    return result
                except ApiError as err:
                    # No verdict for load (Serve's queue bound), nor for a deadline while the workload
                    # answers its readiness probe: whoever sends heavy work with short deadlines must not
                    # open the breaker for every validator. A deadline while it does not answer (its
                    # replicas gone) is its fault. One that hangs fails its health check (stuck_call_s)
                    # and Serve replaces it; one that is slow is shed by admission.
                    if err.code is ErrorCode.shed or (err.code is ErrorCode.deadline_exceeded
                                                      and self.workload_ready.get(workload, False)):
                        verdict = None
                    raise
                except asyncio.CancelledError:  # the caller went away
                    verdict = None
                    raise
                finally:
                    if verdict is None:
                        breaker.abandon()
                    else:
                        breaker.record(verdict)
        except Shed as exc:
            self.edge.offered(route.path, prio, shed=True)
            raise shed(f"the {workload} workload is at capacity: {exc.reason}", retry_after_s=1) from None
        except QueueDeadline:
            self.edge.offered(route.path, prio, shed=True)
            raise deadline_exceeded(timeout) from None

    async def _open_stream(self, route: Route, parsed, prio: float, deadline: float, timeout: float) -> EventStream:
        """As _admit_and_call, for a streamed answer: the breaker and the slot are taken here (their
        refusals are JSON errors); the run, its verdict and the slot's release go with the stream.
        Always on the stable side of a rollout."""
        breaker, workload = route.breaker, route.adapter.workload
        if breaker.state == OPEN:
            raise breaker_open(workload, breaker)
        held = contextlib.AsyncExitStack()
        try:
            await held.enter_async_context(route.admission.slot(prio, deadline, route.adapter.cost(parsed)))
        except (Shed, QueueDeadline) as exc:
            self.edge.offered(route.path, prio, shed=True)
            if isinstance(exc, QueueDeadline):
                raise deadline_exceeded(timeout) from None
            raise shed(f"the {workload} workload is at capacity: {exc.reason}", retry_after_s=1) from None
        self.edge.offered(route.path, prio, shed=False)
        remaining = deadline - self.clock()
        if remaining <= 0 or not breaker.allow():
            await held.aclose()
            if remaining <= 0:
                raise deadline_exceeded(timeout)
            raise breaker_probing(workload)
        stream = EventStream()
        stream.on_close(held.aclose)

        def judge():
            if stream.verdict is None:
                breaker.abandon()
            else:
                breaker.record(stream.verdict)

        stream.on_close(judge)
        source = route.adapter.stream(parsed, route.workload, time.time() + remaining)
        stream.on_close(source.cancel)  # a run still going is cancelled (the caller hung up)
        stream.events = self._events(stream, source, workload, deadline, timeout)
        return stream

    async def _events(self, stream: EventStream, source, workload: str, deadline: float,
                      timeout: float) -> AsyncIterator[bytes]:
        def failed(code: ErrorCode, message: str, verdict: Optional[bool]) -> bytes:
            stream.outcome, stream.verdict = code.value, verdict
            return sse_event("error", {"code": code.value, "message": message})

        # A deadline while the workload answers its readiness probe is no verdict on it (as in _admit_and_call).
        deadline_verdict = None if self.workload_ready.get(workload, False) else True
        try:
            while True:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                try:
                    name, data = await asyncio.wait_for(source.__anext__(), remaining)
                except StopAsyncIteration:
                    return
                if name == "answer":
                    stream.verdict = False
                elif name == "error":  # the run's own deadline passed in the workload
                    stream.outcome, stream.verdict = ErrorCode.deadline_exceeded.value, deadline_verdict
                yield sse_event(name, data)
        except asyncio.TimeoutError:
            yield failed(ErrorCode.deadline_exceeded, f"the deadline ({timeout:g} s) passed before the run ended",
                         deadline_verdict)
        except REPLICA_GONE:
            yield failed(ErrorCode.unavailable, f"the {workload} workload went away mid-run; send it again", True)
        except Exception:
            log.exception("a streamed %s run failed inside the miner", workload)
            yield failed(ErrorCode.internal_error, "the miner failed this run", True)

    async def _call_workload(self, route: Route, handle, parsed, deadline: float, timeout: float) -> dict:
        """One call on `handle` (a deployment of the route's workload) under `deadline` (monotonic)."""
        workload = route.adapter.workload
        for attempt in range(DEAD_REPLICA_RETRIES + 1):
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise deadline_exceeded(timeout)
            try:
                call = route.adapter.run(parsed, handle, time.time() + remaining, route.subnet.allow_degraded)
                return await asyncio.wait_for(call, remaining)
            except (asyncio.TimeoutError, DeadlinePassed):
                raise deadline_exceeded(timeout) from None
            except BackPressureError:
                raise shed(f"the {workload} workload's queue is full", retry_after_s=1) from None
            except REPLICA_GONE:
                if not route.adapter.idempotent or attempt == DEAD_REPLICA_RETRIES:
                    raise unavailable(f"the {workload} workload is restarting", retry_after_s=2) from None
                log.warning("a %s replica went away mid-call; trying another", workload)
                await asyncio.sleep(random.uniform(0, RETRY_BACKOFF_S * 2**attempt))
        raise AssertionError("unreachable")
