"""Bad input against the session's miner: generated from its OpenAPI (schemathesis) and by
hypothesis, plus the wire-level cases a generator cannot make (truncated bodies, huge
headers, slow clients). Never a 500, always a JSON error, and nothing unauthenticated
reaches the model.
"""

import json
import socket
import time

import bittensor
import hypothesis.strategies as st
import schemathesis
from bittensor.sp_core import Keypair
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from tests.conftest import MINER

ALICE = Keypair.create_from_uri("//Alice")
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
AUTH_NAMES = ["X-Bittensor-Version", "X-Bittensor-Hotkey", "X-Bittensor-Nonce", "X-Bittensor-Signature",
              "X-Bittensor-Receiver", "X-Bittensor-Crypto", "X-Bittensor-Timeout", "Content-Type", "Content-Length"]


WORKLOADS = ("Embeddings", "Diffusion", "Agents")
WORKLOAD_PATHS = {"/v1/embeddings", "/v1/images/generations", "/v1/agents/runs"}


def assert_refusal_shape(status: int, content_type, body: bytes):
    if isinstance(content_type, list):  # schemathesis keeps every value of a header
        content_type = content_type[0] if content_type else ""
    assert status != 500 and status < 600, (status, body[:200])
    if status >= 400:
        assert content_type.startswith("application/json"), (status, content_type, body[:200])


def test_openapi_operations_fuzzed_by_schemathesis(miner):
    """Every operation in /openapi.json, valid and invalid generated input, unsigned."""
    before = [miner.workload_stats(d) for d in WORKLOADS]
    schema = schemathesis.openapi.from_url(miner.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {*WORKLOAD_PATHS, "/health", "/ready", "/info"}
    calls = 0
    for operation in operations:
        # GETs take no input: there is nothing to make invalid.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method.upper() == "POST" else [])
        for mode in modes:
            @FUZZ
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                nonlocal calls
                resp = case.call(base_url=miner.url, timeout=30)
                calls += 1
                assert_refusal_shape(resp.status_code, resp.headers.get("content-type", ""), resp.content)
                if operation.path in WORKLOAD_PATHS:
                    assert resp.status_code in (401, 403, 408, 413, 415, 422, 429, 503), resp.text

            check()
    assert calls > 100
    assert [miner.workload_stats(d) for d in WORKLOADS] == before, "an unauthenticated request reached a model"


header_values = st.one_of(st.text(max_size=200), st.from_regex(r"[0-9a-fx]{0,140}", fullmatch=True),
                          st.sampled_from(["", "1", "-1", "nan", "inf", "1e309", "btauth/1", "sr25519", "ed25519"]))


@FUZZ
@given(headers=st.dictionaries(st.sampled_from(AUTH_NAMES), header_values, max_size=8),
       body=st.one_of(st.binary(max_size=2000), st.just(b'{"input": "x"}')))
def test_hypothesis_headers_and_bodies_never_break_the_router(miner, headers, body):
    clean = {k: v for k, v in headers.items()
             if v.isprintable() and v.isascii() and v == v.strip() and k != "Content-Length"}
    resp = miner.http.post("/v1/embeddings", content=body, headers=clean)
    assert_refusal_shape(resp.status_code, resp.headers.get("content-type", ""), resp.content)
    # 403 not_registered: a claimed hotkey the metagraph does not know is refused before its signature is checked.
    assert resp.status_code in (401, 408, 413, 415, 422) or (resp.status_code, resp.json()["error"]) == (
        403, "not_registered"), resp.text


@FUZZ
@given(payload=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
                            lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                            max_leaves=20)
       | st.fixed_dictionaries({"input": st.one_of(st.text(max_size=300), st.lists(st.text(max_size=100), max_size=20))},
                               optional={"model": st.text(max_size=20), "encoding_format": st.text(max_size=10),
                                         "user": st.text(max_size=10)}))
def test_signed_generated_bodies_get_200_or_422(miner, payload):
    """Authenticated callers with arbitrary JSON (ints past 64 bits, NaN included): an answer or
    a 422 naming the problem, never a 500."""
    body = json.dumps(payload).encode()
    headers = bittensor.http_auth.sign(ALICE, method="POST", path="/v1/embeddings", body=body, receiver_ss58=MINER)
    resp = miner.http.post("/v1/embeddings", content=body, headers={**headers, "Content-Type": "application/json"})
    assert resp.status_code in (200, 422), resp.text
    if resp.status_code == 422:
        assert resp.json()["error"] in ("invalid_request", "invalid_json", "limit_exceeded")


@settings(FUZZ, max_examples=30)
@given(payload=st.fixed_dictionaries(
    {"prompt": st.text(max_size=40)},
    optional={"n": st.integers(-2, 6), "size": st.sampled_from(["64x64", "64x128", "65x64", "0x0", "99999x1", "x", ""]),
              "steps": st.integers(-1, 20) | st.floats(allow_nan=True) | st.text(max_size=3),
              "seed": st.integers(-1, 2**64), "preset": st.sampled_from(["fast", "quality", "ultra", ""]),
              "negative_prompt": st.text(max_size=20) | st.none(), "response_format": st.sampled_from(["b64_json", "url"])}))
def test_signed_generated_image_requests_get_200_or_422(miner, payload):
    body = json.dumps(payload).encode()
    path = "/v1/images/generations"
    headers = bittensor.http_auth.sign(ALICE, method="POST", path=path, body=body, receiver_ss58=MINER)
    resp = miner.http.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
    assert resp.status_code in (200, 422), resp.text
    if resp.status_code == 422:
        assert resp.json()["error"] in ("invalid_request", "invalid_json", "limit_exceeded")
    else:
        assert len(resp.json()["data"]) == payload.get("n", 1)


def raw_exchange(miner, data: bytes, pause_s: float = 0.0, rest: bytes = b"", read_s: float = 15.0) -> bytes:
    host, port = miner.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_s) as sock:
        sock.sendall(data)
        if pause_s:
            time.sleep(pause_s)
            if rest:
                sock.sendall(rest)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and len(b"".join(chunks)) > 20:
                    head, _, tail = b"".join(chunks).partition(b"\r\n\r\n")
                    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), None)
                    if length is not None and len(tail) >= length:
                        break
        except socket.timeout:
            pass
        return b"".join(chunks)


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0


def signed_head(body: bytes, declared: int) -> bytes:
    headers = bittensor.http_auth.sign(ALICE, method="POST", path="/v1/embeddings", body=body, receiver_ss58=MINER)
    lines = [f"{k}: {v}" for k, v in headers.items()]
    return ("POST /v1/embeddings HTTP/1.1\r\nHost: miner\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode()


def test_truncated_body_is_refused_and_reaches_no_model(miner):
    before = miner.workload_stats()
    body = b'{"input": "a body that never finishes arriving"}'
    reply = raw_exchange(miner, signed_head(body, len(body)) + body[:10])  # then the client closes its side
    assert status_of(reply) in (0, 400, 408), reply[:300]
    assert miner.workload_stats() == before
    assert miner.post({"input": "still serving"}).status_code == 200


def test_slow_body_gets_408_in_json(miner):
    """A client trickling its body past the request timeout (HAProxy's, 2 s here, which holds the
    request until its body is in: the router never sees it) gets a JSON 408."""
    body = b'{"input": "slow"}'
    limit = miner.cfg.router.body_timeout_s
    started = time.monotonic()
    reply = raw_exchange(miner, signed_head(body, len(body)) + body[:5], pause_s=limit + 1, rest=body[5:])
    assert status_of(reply) == 408, reply[:300]
    assert b'"body_timeout"' in reply and b"application/json" in reply.lower()
    assert time.monotonic() - started < limit + 10


def test_a_slow_body_flood_leaves_validators_served(miner):
    """More slow bodies than the router reads at once (router.max_body_reads), each past
    HAProxy's buffer (16 KiB, so the router reads them): validators' signed requests sent
    meanwhile are all answered; the reads furthest behind are cut at once to make room, the
    rest time out; every slow body gets a JSON 408."""
    import selectors

    host, port = miner.url.removeprefix("http://").split(":")
    # It claims a validator's hotkey with its headers (signed for another body): an unsigned one is
    # refused by HAProxy at once (401) and never holds a router's read.
    claimed = bittensor.http_auth.sign(ALICE, method="POST", path="/v1/embeddings", body=b"{}", receiver_ss58=MINER)
    head = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + b"".join(f"{k}: {v}\r\n".encode() for k, v in claimed.items())
            + b"Content-Length: 65536\r\n\r\n" + b" " * 20480)  # then nothing more
    extra = 32  # per router replica, beyond what it reads at once
    flood, sent_at = [], {}
    try:
        for _ in range((miner.cfg.router.max_body_reads + extra) * miner.cfg.router.num_replicas):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(head)
            flood.append(sock)
            sent_at[sock] = time.monotonic()
        time.sleep(0.3)
        answers = [miner.post({"input": f"a validator during the flood {i}"}) for i in range(8)]
        assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
        assert max(a.elapsed.total_seconds() for a in answers) < 1
        replies, waited = {}, {}
        with selectors.DefaultSelector() as sel:
            for sock in flood:
                sel.register(sock, selectors.EVENT_READ)
            end = time.monotonic() + 15
            while len(replies) < len(flood) and time.monotonic() < end:
                for key, _ in sel.select(timeout=0.5):
                    waited[key.fileobj] = time.monotonic() - sent_at[key.fileobj]
                    sel.unregister(key.fileobj)
                    reply = key.fileobj.recv(4096)
                    while reply and not reply.endswith(b"}"):  # headers and body may come apart
                        more = key.fileobj.recv(4096)
                        if not more:
                            break
                        reply += more
                    replies[key.fileobj] = reply
    finally:
        for sock in flood:
            sock.close()
    assert len(replies) == len(flood) and all(status_of(r) == 408 and b'"body_timeout"' in r
                                              for r in replies.values()), {r[-80:] for r in replies.values()}
    # Cut for the newcomers (the extra slow ones and the validators), long before the 2 s body timeout.
    assert sum(1 for w in waited.values() if w < 1.5) >= extra, sorted(waited.values())[:50]  # (HAProxy's balance varies)


def test_wrong_content_type_is_415(miner):
    # With a validator's headers (unsigned, HAProxy answers 401 first: tests/serve/test_edge.py).
    for content_type in ("text/plain", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"):
        body = b'{"input": "x"}'
        headers = bittensor.http_auth.sign(ALICE, method="POST", path="/v1/embeddings", body=body, receiver_ss58=MINER)
        resp = miner.http.post("/v1/embeddings", content=body, headers={**headers, "Content-Type": content_type})
        assert (resp.status_code, resp.json()["error"]) == (415, "unsupported_media_type")


def test_huge_headers_are_refused_without_a_500(miner):
    for size in (16 * 1024, 128 * 1024):
        resp = miner.http.post("/v1/embeddings", content=b"{}", headers={"X-Padding": "a" * size})
        # HAProxy's own 400: its HTML page, not deployments/haproxy/400.http. HAProxy 2.8 (Ray's)
        # ignores errorfiles for errors its H1 parser raises before a stream exists (fixed in 3.2).
        assert resp.status_code in (400, 413, 431), (size, resp.status_code)
    assert miner.post({"input": "still serving"}).status_code == 200
