"""What every protocol adapter shares: strict JSON parsing into a pydantic model, and
422 errors that name the field without echoing the caller's input."""

from __future__ import annotations

from typing import Optional, Protocol, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from serve_app.errors import ApiError, ErrorCode

M = TypeVar("M", bound=BaseModel)


def field_name(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def parse_json(body: bytes, model: type[M]) -> M:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(ErrorCode.invalid_json, f"body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(data, dict):
        raise ApiError(ErrorCode.invalid_request, "body: expected a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # Only location and message: pydantic's `input` would echo the caller's data.
        problems = "; ".join(f"{field_name(e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise ApiError(ErrorCode.invalid_request, problems) from None


def limit_exceeded(field: str, detail: str) -> ApiError:
    return ApiError(ErrorCode.limit_exceeded, f"{field}: {detail}")


class Adapter(Protocol):
    """Maps one route's wire schema to one workload call."""

    workload: str
    request_model: type[BaseModel]
    # May the router send the call again after the replica died mid-request? True only
    # where running it twice gives the same answer and no side effect.
    idempotent: bool

    def parse(self, body: bytes) -> BaseModel: ...

    def cost(self, request: BaseModel) -> float:
        """The parsed request's work in the workload's items (admission's unit)."""

    async def run(self, request: BaseModel, handle, deadline: float, degradable: bool) -> dict:
        """`deadline` is time.time() after which the answer is useless; `degradable`: the
        subnet accepts the workload's cheaper preset under overload."""

    def agreement(self, stable: dict, candidate: dict, canary) -> tuple[Optional[bool], Optional[float]]:
        """A rollout's comparison of two answers to one request (serve_app/router/rollouts.py):
        (agree under the canary's thresholds, the measure), or (None, None) if they are not compared."""

    def unfinished(self, answer: dict) -> bool:
        """An answer that counts as a failure in a rollout though it is a 200 (agents: the step limit)."""


def no_agreement(stable: dict, candidate: dict, canary) -> tuple[None, None]:
    """For workloads whose answers are not compared (a rollout then judges errors and speed)."""
    return None, None
