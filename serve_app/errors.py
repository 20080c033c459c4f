"""The one error shape every refusal takes: JSON {"error": code, "detail": message}.

Details are written for the caller and never carry signatures, bodies or keys.
"""

from __future__ import annotations

import math
from typing import Optional

import orjson
from starlette.responses import Response


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: Optional[dict[str, str]] = None):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


def json_response(body: object, status: int = 200, headers: Optional[dict[str, str]] = None) -> Response:
    # orjson encodes numpy float32 arrays directly: much faster than json for embeddings.
    try:
        content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:
        # Integers beyond 64 bits (a tool's 2**70): encode them as strings.
        content = orjson.dumps(json_safe(body), option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, status_code=status, headers=headers, media_type="application/json")


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
    return json_response({"error": err.code, "detail": err.detail}, err.status, {**err.headers, **(headers or {})})


def not_found(path: str) -> ApiError:
    return ApiError(404, "not_found", f"no route {path}")


def retry_after(seconds: float) -> dict[str, str]:
    """Retry-After in whole seconds, at least 1 (the header takes no fractions)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def unavailable(detail: str, retry_after_s: float = 1) -> ApiError:
    return ApiError(503, "unavailable", detail, retry_after(retry_after_s))


def shed(detail: str, retry_after_s: float = 1) -> ApiError:
    return ApiError(503, "shed", detail, retry_after(retry_after_s))


def deadline_exceeded(timeout_s: float) -> ApiError:
    return ApiError(504, "deadline_exceeded", f"the work could not finish within the {timeout_s:g}s deadline")
