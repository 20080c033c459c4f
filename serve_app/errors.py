"""Every way a request can end other than an answer: one closed catalogue, and the one
JSON shape every refusal takes, {"error": code, "detail": message}.

Each code carries its HTTP status, whether it is the miner's failure (it counts against
the subnet's availability SLO and its watchdog) and whether it is a fast refusal of load
(the caller may send the work elsewhere at once; the load generator counts it apart from
failures). The router, the metrics, the breaker, the load generator, the OpenAPI document,
HAProxy's pages (deployments/haproxy) and the README's table (tests/unit/test_errors.py
checks them) all read it. Details are written for the caller and never carry signatures,
bodies or keys.
"""

from __future__ import annotations

import math
from enum import Enum, auto
from typing import Optional

import orjson
from starlette.responses import Response


MINER, CALLER = True, False  # whose failure: a miner's counts against the availability SLO and the watchdog
REFUSAL, ERROR = True, False  # a fast refusal of load, which the caller may send elsewhere at once; or an error


class ErrorCode(str, Enum):
    """A code is its name: the `error` on the wire and the `outcome` label of the metrics, and
    it compares equal to that string."""

    def _generate_next_value_(name, start, count, last_values):
        return name

    def __new__(cls, code: str, status: int, miner_failure: bool, refusal: bool, meaning: str):
        member = str.__new__(cls, code)
        member._value_ = code
        member.status, member.miner_failure, member.refusal, member.meaning = status, miner_failure, refusal, meaning
        return member

    def __str__(self) -> str:
        return self.value

    # name = (auto(), HTTP status, whose failure, refusal or error, what it means)
    bad_request = (auto(), 400, CALLER, ERROR,
        "the request is malformed (a bad Content-Length; HAProxy: the request line or an oversized header block)")
    client_disconnected = (auto(), 400, CALLER, ERROR,
        "the caller went away before its body was complete")
    unauthenticated = (auto(), 401, CALLER, ERROR,
        "the signature headers failed for another reason")
    malformed_auth = (auto(), 401, CALLER, ERROR,
        "the subnet's signature headers (btauth/1 or Epistula v2) missing or malformed")
    wrong_receiver = (auto(), 401, CALLER, ERROR,
        "the request is signed for another miner's hotkey")
    stale_request = (auto(), 401, CALLER, ERROR,
        "the signature is older than auth.max_age_s (or from the future)")
    replayed_request = (auto(), 401, CALLER, ERROR,
        "this nonce (Epistula: this uuid) was already used")
    bad_signature = (auto(), 401, CALLER, ERROR,
        "the signature does not verify")
    denied = (auto(), 403, CALLER, ERROR,
        "the hotkey is deny-listed")
    not_registered = (auto(), 403, CALLER, ERROR,
        "the hotkey is not registered on the subnet")
    no_validator_permit = (auto(), 403, CALLER, ERROR,
        "the hotkey has no validator permit")
    insufficient_stake = (auto(), 403, CALLER, ERROR,
        "the hotkey's stake is below auth.min_stake")
    not_found = (auto(), 404, CALLER, ERROR,
        "no route at this path")
    method_not_allowed = (auto(), 405, CALLER, ERROR,
        "routes accept POST only")
    body_timeout = (auto(), 408, CALLER, ERROR,
        "the body did not arrive in time, or too slowly")
    body_too_large = (auto(), 413, CALLER, ERROR,
        "the body is over router.max_body_bytes")
    unsupported_media_type = (auto(), 415, CALLER, ERROR,
        "the body is not application/json")
    invalid_timeout = (auto(), 422, CALLER, ERROR,
        "X-Bittensor-Timeout is not a positive number")
    invalid_json = (auto(), 422, CALLER, ERROR,
        "the body is not JSON")
    invalid_request = (auto(), 422, CALLER, ERROR,
        "the body does not match the route's schema (the field is named)")
    limit_exceeded = (auto(), 422, CALLER, ERROR,
        "a configured limit (texts, sizes, steps...) is exceeded (named)")
    rate_limited = (auto(), 429, CALLER, REFUSAL,
        "the hotkey is over its request rate; see Retry-After")
    client_closed = (auto(), 499, CALLER, ERROR,
        "the caller left before the answer (a metrics outcome; nothing is sent)")
    internal_error = (auto(), 500, MINER, ERROR,
        "the miner failed this request (the detail carries the request id)")
    unavailable = (auto(), 503, MINER, ERROR,
        "the miner cannot serve now: metagraph, replay store or workload restarting  (HAProxy: 502 when the router answering went away)")
    shed = (auto(), 503, MINER, REFUSAL,
        "at capacity: the work could not finish inside its deadline; see Retry-After")
    breaker_open = (auto(), 503, MINER, REFUSAL,
        "the workload is failing and refused fast while it recovers")
    deadline_exceeded = (auto(), 504, MINER, ERROR,
        "the work could not finish inside the deadline")

REFUSALS = frozenset(code.value for code in ErrorCode if code.refusal)
MINER_FAILURES = frozenset(code.value for code in ErrorCode if code.miner_failure)


class ApiError(Exception):
    def __init__(self, code: ErrorCode, detail: str, headers: Optional[dict[str, str]] = None):
        super().__init__(detail)
        self.code = code
        self.status = code.status
        self.detail = detail
        self.headers = headers or {}


def json_bytes(body: object) -> bytes:
    # orjson encodes numpy float32 arrays directly: much faster than json for embeddings.
    try:
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:
        # Integers beyond 64 bits (a tool's 2**70): encode them as strings.
        return orjson.dumps(json_safe(body), option=orjson.OPT_SERIALIZE_NUMPY)


def json_response(body: object, status: int = 200, headers: Optional[dict[str, str]] = None) -> Response:
    return Response(json_bytes(body), status_code=status, headers=headers, media_type="application/json")


def sse_event(event: str, data: object) -> bytes:
    """One Server-Sent Event: its name and its data as one line of JSON."""
    return b"event: " + event.encode() + b"\ndata: " + json_bytes(data) + b"\n\n"


JSON_INTS = (-(2**63), 2**63 - 1)  # signed 64 bits: what JSON readers take as integers (orjson, Go, Java)


def json_safe(value: object) -> object:
    """`value` with every number JSON cannot carry as its exact text: integers beyond signed
    64 bits ("1180591620717411303424", not a float that would round it) and non-finite floats
    ("inf", "-inf", "nan"). Tuples become lists and dict keys strings; anything else (numpy
    arrays included) is left for the encoder."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if JSON_INTS[0] <= value <= JSON_INTS[1]:
            return value
        try:
            return str(value)
        except ValueError:  # over Python's 4300-digit limit for int -> str
            return f"an integer of {value.bit_length()} bits"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def error_response(err: ApiError, headers: Optional[dict[str, str]] = None) -> Response:
    return json_response({"error": err.code.value, "detail": err.detail}, err.status, {**err.headers, **(headers or {})})


def not_found(path: str) -> ApiError:
    return ApiError(ErrorCode.not_found, f"no route {path}")


def retry_after(seconds: float) -> dict[str, str]:
    """Retry-After in whole seconds, at least 1 (the header takes no fractions)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def unavailable(detail: str, retry_after_s: float = 1) -> ApiError:
    return ApiError(ErrorCode.unavailable, detail, retry_after(retry_after_s))


def shed(detail: str, retry_after_s: float = 1) -> ApiError:
    return ApiError(ErrorCode.shed, detail, retry_after(retry_after_s))


def deadline_exceeded(timeout_s: float) -> ApiError:
    return ApiError(ErrorCode.deadline_exceeded, f"the work could not finish within the {timeout_s:g}s deadline")
