"""The one error shape every refusal takes: JSON {"error": code, "detail": message}.

Details are written for the caller and never carry signatures, bodies or keys.
"""

from __future__ import annotations

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


def unavailable(detail: str, retry_after_s: int = 1) -> ApiError:
    return ApiError(503, "unavailable", detail, {"Retry-After": str(retry_after_s)})
