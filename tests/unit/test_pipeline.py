"""The request pipeline's order, without Ray or Serve: fakes for the authenticator, the
adapter and the workload; real body reads, breaker, admission and rate limit."""

import asyncio

import orjson
import pytest
import ray

from serve_app.chain.metagraph import MetagraphView, Neuron
from serve_app.config import AdmissionConfig, SnapshotMetagraph, SubnetConfig
from serve_app.errors import ApiError, ErrorCode
from serve_app.ops.admission import Admission
from serve_app.ops.breaker import CircuitBreaker
from serve_app.ops.ratelimit import RateLimiter
from serve_app.router.auth import Authenticator, Signed
from serve_app.router.body import BodyReads
from serve_app.router.pipeline import RequestPipeline
from serve_app.router.routes import Route
from starlette.requests import Request

PATH = "/v1/embeddings"
VALIDATOR, STRANGER = "5Validator", "5Stranger"
SUBNET = SubnetConfig(netuid=7, metagraph=SnapshotMetagraph(path="unused.json"))
VIEW = MetagraphView(netuid=7, block=1, neurons={VALIDATOR: Neuron(0, VALIDATOR, 5000.0, True)})


class Events(list):
    def add(self, name):
        self.append(name)


class FakeAuth:
    """The Authenticator's three steps, recorded; `verify_error`/`claim_error` refuse."""

    def __init__(self, events, verify_error=None, claim_error=None):
        self.events, self.verify_error, self.claim_error = events, verify_error, claim_error

    claimed_hotkey = staticmethod(Authenticator.claimed_hotkey)  # reads one header: the real one

    def verify(self, headers, body, *, method, path, policy):
        self.events.add("verify")
        if self.verify_error:
            raise self.verify_error
        return Signed(headers["X-Bittensor-Hotkey"], 1, 1, policy)

    async def claim(self, signed, max_open_s):
        self.events.add("claim")
        if self.claim_error:
            raise self.claim_error

    def settle(self, signed):
        self.events.add("settle")


class FakeAdapter:
    workload = "embeddings"
    idempotent = True

    def __init__(self, events, run=None):
        self.events, self._run = events, run

    def parse(self, body):
        self.events.add("parse")
        return orjson.loads(body)

    def cost(self, parsed):
        return 1.0

    async def run(self, parsed, handle, deadline, degradable):
        self.events.add("run")
        if self._run is not None:
            return await self._run()
        return {"data": parsed["input"]}


class FakeMetagraph:
    view = VIEW


class SheddingAdmission(Admission):
    def would_shed(self, priority, deadline):
        return True


class FakeRateLimit:
    def __init__(self, events, wait=None):
        self.events, self.wait = events, wait

    def check(self, caller, view, allow_listed):
        self.events.add("rate_limit")
        return self.wait


def make(events, *, auth=None, adapter=None, admission=None, rate_limit=None, max_in_progress=100, ready=True):
    route = Route(path=PATH, subnet=SUBNET, metagraph=FakeMetagraph(), adapter=adapter or FakeAdapter(events),
                  workload=object(), breaker=CircuitBreaker(SUBNET.breaker),
                  admission=admission or Admission(AdmissionConfig(), in_flight_items=8),
                  rate_limit=rate_limit or RateLimiter(SUBNET.rate_limit, replicas=1))
    ended = []
    pipeline = RequestPipeline({PATH: route}, auth or FakeAuth(events), BodyReads(8, 1 << 20, 5.0, 1.0, 1.0),
                               max_in_progress=max_in_progress, workload_ready={"embeddings": ready},
                               record=ended.append)
    return pipeline, route, ended


def request(events, *, path=PATH, method="POST", hotkey=VALIDATOR, body=b'{"input": "x"}', extra=(), drop=()):
    auth = [(b"x-bittensor-version", b"1"), (b"x-bittensor-hotkey", hotkey.encode()), (b"x-bittensor-nonce", b"1"),
            (b"x-bittensor-signature", b"0x00")]
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-torchrank-client", b"10.0.0.7"), *(h for h in auth if h[0] not in drop), *extra]
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": headers}

    async def receive():
        events.add("body")
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def answer(pipeline, req):
    response = asyncio.run(pipeline.handle(req, "rid-1"))
    return response.status_code, orjson.loads(response.body)


def test_an_answered_request_walks_every_step_in_order():
    events = Events()
    pipeline, route, ended = make(events, rate_limit=FakeRateLimit(Events()))
    route.rate_limit.events = events
    status, body = answer(pipeline, request(events))
    assert (status, body) == (200, {"data": "x"})
    assert events == ["body", "verify", "claim", "rate_limit", "parse", "run", "settle"]
    (end,) = ended
    assert (end.outcome, end.status, end.admitted, end.caller, end.who) == ("ok", 200, True, VALIDATOR, "validator")
    assert pipeline.in_progress == 0 and pipeline.in_flight == {7: 0}


def test_an_early_shed_reads_no_body_and_does_no_signature_work():
    events = Events()
    pipeline, _, ended = make(events, admission=SheddingAdmission(AdmissionConfig(), in_flight_items=8))
    status, body = answer(pipeline, request(events))
    assert (status, body["error"]) == (503, "shed")
    assert events == []  # no body read, no verify, no replay store
    assert (ended[0].outcome, ended[0].admitted) == ("shed", False)


def test_the_entry_gate_refuses_before_anything_else():
    events = Events()
    pipeline, _, ended = make(events, max_in_progress=0)
    status, body = answer(pipeline, request(events))
    assert (status, body["error"]) == (503, "shed") and events == []


def test_an_unregistered_claimed_hotkey_is_refused_before_the_signature():
    events = Events()
    pipeline, _, ended = make(events)
    status, body = answer(pipeline, request(events, hotkey=STRANGER))
    assert (status, body["error"]) == (403, "not_registered")
    assert events == []  # a stranger's key costs no body read, no sr25519 check and no store call
    assert ended[0].who == "unregistered"


@pytest.mark.parametrize("headers", [{"drop": (b"x-bittensor-signature",)},
                                     {"extra": ((b"x-bittensor-hotkey", VALIDATOR.encode()),)},
                                     {"extra": ((b"x-bittensor-nonce", b"2"),)}])
def test_missing_or_repeated_auth_headers_are_refused_before_the_body(headers):
    events = Events()
    pipeline, _, _ = make(events)
    status, body = answer(pipeline, request(events, **headers))
    assert (status, body["error"]) == (401, "malformed_auth") and events == []


def test_the_edge_trusts_the_address_of_a_verified_fresh_request_only():
    trusted = []
    events = Events()
    pipeline, _, _ = make(events)
    pipeline.edge.trust = trusted.append
    assert answer(pipeline, request(events))[0] == 200
    assert trusted == ["10.0.0.7"]
    for auth in (FakeAuth(events, verify_error=ApiError(ErrorCode.bad_signature, "no")),
                 FakeAuth(events, claim_error=ApiError(ErrorCode.replayed_request, "again"))):
        pipeline.auth = auth
        assert answer(pipeline, request(events))[0] == 401
    assert trusted == ["10.0.0.7"]  # neither a bad signature nor a replay makes an address trusted


def test_a_bad_signature_never_reaches_the_replay_store():
    events = Events()
    auth = FakeAuth(events, verify_error=ApiError(ErrorCode.bad_signature, "no"))
    pipeline, _, _ = make(events, auth=auth)
    assert answer(pipeline, request(events))[0] == 401
    assert events == ["body", "verify"]


def test_a_replay_is_refused_before_parsing_and_its_nonce_is_not_settled():
    events = Events()
    auth = FakeAuth(events, claim_error=ApiError(ErrorCode.replayed_request, "again"))
    pipeline, _, _ = make(events, auth=auth)
    assert answer(pipeline, request(events)) == (401, {"error": "replayed_request", "detail": "again"})
    assert events == ["body", "verify", "claim"]


def test_a_rate_limited_caller_is_refused_before_parsing_and_its_nonce_settled():
    events = Events()
    pipeline, _, ended = make(events, rate_limit=FakeRateLimit(events, wait=3.2))
    pipeline.routes[PATH].rate_limit.events = events
    status, body = answer(pipeline, request(events))
    assert (status, body["error"]) == (429, "rate_limited")
    assert events == ["body", "verify", "claim", "rate_limit", "settle"]
    assert not ended[0].admitted


def test_an_open_breaker_refuses_before_admission_and_the_workload():
    events = Events()
    pipeline, route, ended = make(events)
    for _ in range(SUBNET.breaker.consecutive_failures):
        route.breaker.record(True)
    status, body = answer(pipeline, request(events))
    assert (status, body["error"]) == (503, "breaker_open")
    assert "run" not in events and ended[0].admitted  # admitted: it counts against availability


def test_unknown_paths_and_other_methods_are_refused_before_the_body():
    events = Events()
    pipeline, _, ended = make(events)
    assert answer(pipeline, request(events, path="/nope"))[0] == 404
    response = asyncio.run(pipeline.handle(request(events, method="GET"), "rid"))
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert events == [] and [e.route is None for e in ended] == [True, False]


def test_a_replica_that_died_mid_call_is_retried_on_another():
    events = Events()
    calls = []

    async def dies_once():
        calls.append(1)
        if len(calls) == 1:
            raise ray.exceptions.RayActorError()
        return {"data": "again"}

    pipeline, _, _ = make(events, adapter=FakeAdapter(events, run=dies_once))
    assert answer(pipeline, request(events)) == (200, {"data": "again"})
    assert events.count("run") == 2


@pytest.mark.parametrize("ready, breaker_failures", [(True, 0), (False, 1)])
def test_a_missed_deadline_is_the_workloads_fault_only_while_it_does_not_answer(ready, breaker_failures):
    events = Events()

    async def slow():
        await asyncio.sleep(5)

    pipeline, route, _ = make(events, adapter=FakeAdapter(events, run=slow), ready=ready)
    req = request(events)
    req.scope["headers"].append((b"x-bittensor-timeout", b"0.05"))
    assert answer(pipeline, req)[1]["error"] == "deadline_exceeded"
    assert route.breaker.consecutive == breaker_failures


def test_a_failure_inside_the_miner_is_a_500_naming_the_request_id():
    events = Events()

    async def broken():
        raise KeyError("bug")

    pipeline, _, ended = make(events, adapter=FakeAdapter(events, run=broken))
    status, body = answer(pipeline, request(events))
    assert (status, body["error"]) == (500, "internal_error") and "rid-1" in body["detail"]
    assert ended[0].outcome == "internal_error" and events[-1] == "settle"


# Streamed answers (issue 21): Server-Sent Events that hold the slot until they end.
class FakeSource:
    """A Serve response generator's surface: async iteration of (event, data) and cancel()."""

    def __init__(self, events, items, delay_s=0.0):
        self.events, self.items, self.delay_s, self.cancelled = events, list(items), delay_s, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(self.delay_s)
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True
        self.events.add("cancel")


class StreamingAdapter(FakeAdapter):
    workload = "agents"

    def __init__(self, events, source):
        super().__init__(events)
        self.source = source

    @staticmethod
    def streams(parsed):
        return parsed.get("stream", False)

    def stream(self, parsed, handle, deadline):
        self.events.add("stream")
        return self.source


def sse(pipeline, req, hang_up_after=None):
    """(status, content type, [(event, data)]) of a streamed answer, read as the ASGI server does."""
    async def scenario():
        response = await pipeline.handle(req, "rid-1")
        messages = []

        async def receive():
            await asyncio.sleep(3600)

        async def send(message):
            messages.append(message)
            if hang_up_after is not None and message.get("body") and sum(bool(m.get("body")) for m in messages) \
                    >= hang_up_after:
                raise OSError("the caller went away")

        from starlette.requests import ClientDisconnect

        try:
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
        except (OSError, ClientDisconnect):
            pass
        return messages

    messages = asyncio.run(scenario())
    start = messages[0]
    body = b"".join(m.get("body", b"") for m in messages[1:])
    events = []
    for block in body.decode().split("\n\n"):
        if block:
            name, data = block.split("\n")
            events.append((name.removeprefix("event: "), orjson.loads(data.removeprefix("data: "))))
    return start["status"], dict(start["headers"])[b"content-type"], events


def test_a_streamed_run_is_events_and_holds_its_slot_until_the_last():
    events = Events()
    source = FakeSource(events, [("step", {"tool": "calculator", "result": 2**70}),
                                 ("answer", {"answer": "x", "finish": "answer"})])
    admission = Admission(AdmissionConfig(), in_flight_items=8)
    pipeline, route, ended = make(events, adapter=StreamingAdapter(events, source), admission=admission)
    status, kind, got = sse(pipeline, request(events, body=b'{"input": "x", "stream": true}'))
    assert status == 200 and kind.startswith(b"text/event-stream")
    assert got == [("step", {"tool": "calculator", "result": str(2**70)}), ("answer", {"answer": "x", "finish": "answer"})]
    assert events.index("settle") < events.index("cancel")  # the nonce settled at the start, not the end
    (end,) = ended  # recorded once, when the stream ended
    assert (end.outcome, end.status) == ("ok", 200) and admission.in_flight == 0
    assert pipeline.in_progress == 0 and pipeline.in_flight == {7: 0} and route.breaker.state == "closed"


def test_a_caller_that_hangs_up_mid_stream_cancels_the_run_and_frees_the_slot():
    events = Events()
    source = FakeSource(events, [("step", {"n": i}) for i in range(100)], delay_s=0.001)
    admission = Admission(AdmissionConfig(), in_flight_items=8)
    pipeline, _, ended = make(events, adapter=StreamingAdapter(events, source), admission=admission)
    sse(pipeline, request(events, body=b'{"input": "x", "stream": true}'), hang_up_after=2)
    assert source.cancelled and admission.in_flight == 0 and pipeline.in_progress == 0
    assert ended[0].outcome == "client_closed"


def test_a_stream_past_its_deadline_ends_with_an_error_event():
    events = Events()
    source = FakeSource(events, [("step", {"n": 1})] * 50, delay_s=0.1)
    pipeline, _, ended = make(events, adapter=StreamingAdapter(events, source))
    req = request(events, body=b'{"input": "x", "stream": true}')
    req.scope["headers"].append((b"x-bittensor-timeout", b"0.35"))
    _, _, got = sse(pipeline, req)
    assert got[-1][0] == "error" and got[-1][1]["code"] == "deadline_exceeded" and len(got) < 6
    assert source.cancelled and ended[0].outcome == "deadline_exceeded"


def test_refusals_before_a_stream_stay_json_errors():
    events = Events()
    source = FakeSource(events, [])
    pipeline, route, _ = make(events, adapter=StreamingAdapter(events, source))
    for _ in range(route.breaker.cfg.consecutive_failures):
        route.breaker.record(True)
    status, body = answer(pipeline, request(events, body=b'{"input": "x", "stream": true}'))
    assert (status, body["error"]) == (503, "breaker_open") and "stream" not in events


def test_the_deadline_runs_from_when_haproxy_had_the_request():
    from serve_app.router.policy import waited_s

    now = 1_000_000.0
    assert waited_s(str(int((now - 1.5) * 1000)), now, 5.0) == 1.5  # it waited 1.5 s for a busy router
    assert waited_s(str(int((now - 60) * 1000)), now, 5.0) == 5.0  # at most its whole timeout: a 504 at once
    assert waited_s(str(int((now + 2) * 1000)), now, 5.0) == 0.0  # clocks a little apart: no credit
    assert waited_s(None, now, 5.0) == 0.0 and waited_s("soon", now, 5.0) == 0.0  # not through HAProxy
