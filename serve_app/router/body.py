"""Reading a request body under a size cap, refusing early where the size is declared."""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect, Request

from serve_app.errors import ApiError


def check_content_type(value: str | None) -> None:
    """JSON or unstated; anything else (a form, plain text) is refused with 415."""
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", f"the body must be application/json, not {media[:80] or 'empty'}")


def too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"request body is over the {limit}-byte limit")


async def read_capped(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 over `limit` bytes and 408 if it takes over `timeout_s`
    to arrive (a slow client must not hold a router slot)."""
    try:
        return await asyncio.wait_for(_read(request, limit), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g}s") from None


async def _read(request: Request, limit: int) -> bytes:
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
