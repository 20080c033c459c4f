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
    content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, status_code=status, headers=headers, media_type="application/json")


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
