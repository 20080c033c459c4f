"""Reading a request body under a size cap, refusing early where the size is declared."""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

from serve_app.errors import ApiError


def too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"request body is over the {limit}-byte limit")


async def read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", "Content-Length is not a whole number")
        if int(declared) > limit:
            raise too_large(limit)  # before reading a byte of it
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client went away before the body was complete") from None
    return b"".join(chunks)
