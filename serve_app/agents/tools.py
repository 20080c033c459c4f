"""The agent's built-in tools: typed arguments, a timeout each, retries for retryable failures.

A tool is an async function of a validated pydantic model. A validation error, an unknown
tool or a failure comes back to the model as the step's `error` (it can correct itself);
only the run's own deadline ends a run early. Tools run on the replica's event loop or
elsewhere (the embeddings deployment, the network), never on the model's thread, so a
slow tool never idles the model for other sessions.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.agents.calculator import CalcError, evaluate

RETRY_BASE_S = 0.05  # doubled per attempt, full jitter


class ToolError(Exception):
    """A tool failed; `retryable` failures (timeouts, 5xx, connection errors) are tried again."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalculatorArgs(Args):
    expression: str = Field(max_length=256, description="Arithmetic: + - * / // % **, sqrt, log, min, max, pi, e...")


class ScratchpadArgs(Args):
    op: str = Field(pattern="^(get|set|delete|list)$")
    key: Optional[str] = Field(default=None, max_length=128)
    value: Optional[str] = Field(default=None, max_length=4096)


class RetrieveArgs(Args):
    query: str = Field(min_length=1, max_length=2000)
    top_k: int = Field(default=3, ge=1, le=20)


class FetchArgs(Args):
    url: str = Field(max_length=2048)


@dataclass
class Session:
    """What tools of one run share: its scratchpad and the documents the validator sent."""

    documents: list[str] = field(default_factory=list)
    scratchpad: dict[str, str] = field(default_factory=dict)
    max_scratchpad_keys: int = 64


@dataclass(frozen=True)
class Tool:
    name: str
    args: type[Args]
    run: Callable[[Args, Session], Awaitable[object]]
    timeout_s: float = 5.0
    retries: int = 0


async def calculator(args: CalculatorArgs, session: Session) -> object:
    try:
        return evaluate(args.expression)
    except CalcError as exc:
        raise ToolError(str(exc)) from None


async def scratchpad(args: ScratchpadArgs, session: Session) -> object:
    pad = session.scratchpad
    if args.op == "list":
        return sorted(pad)
    if args.key is None:
        raise ToolError(f"op {args.op!r} needs a key")
    if args.op == "get":
        return pad.get(args.key)
    if args.op == "delete":
        return pad.pop(args.key, None) is not None
    if args.value is None:
        raise ToolError("op 'set' needs a value")
    if args.key not in pad and len(pad) >= session.max_scratchpad_keys:
        raise ToolError(f"the scratchpad holds at most {session.max_scratchpad_keys} keys")
    pad[args.key] = args.value
    return True


async def run_tool(tool: Tool, raw_args: object, session: Session) -> object:
    """The tool's result; ToolError with the reason otherwise (after retries, within its timeout each)."""
    try:
        args = tool.args.model_validate(raw_args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}" for e in exc.errors()[:5])
        raise ToolError(f"invalid args for {tool.name}: {problems}") from None
    for attempt in range(tool.retries + 1):
        try:
            return await asyncio.wait_for(tool.run(args, session), tool.timeout_s)
        except asyncio.TimeoutError:
            error = ToolError(f"{tool.name} timed out after {tool.timeout_s:g}s", retryable=True)
        except ToolError as exc:
            error = exc
        if not error.retryable or attempt == tool.retries:
            raise error
        await asyncio.sleep(random.uniform(0, RETRY_BASE_S * 2**attempt))
    raise AssertionError("unreachable")


def make_retrieve(embed: Callable[[list[str]], Awaitable[list]]) -> Callable:
    """The `retrieve` tool over the miner's embeddings: the documents most similar to a query."""

    async def retrieve(args: RetrieveArgs, session: Session) -> object:
        if not session.documents:
            raise ToolError("this run has no documents to search")
        vectors = await embed([args.query, *session.documents])
        query, docs = vectors[0], vectors[1:]
        scores = [float(sum(q * d for q, d in zip(query, doc))) for doc in docs]  # unit vectors: cosine
        best = sorted(range(len(docs)), key=lambda i: -scores[i])[: args.top_k]
        return [{"index": i, "score": round(scores[i], 4), "text": session.documents[i][:500]} for i in best]

    return retrieve


def make_fetch(allowed_hosts: tuple[str, ...], max_bytes: int = 65536) -> Callable:
    """The `http_fetch` tool: GET from the allow-listed hosts only (https and http), bounded."""

    async def fetch(args: FetchArgs, session: Session) -> object:
        parts = urlsplit(args.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ToolError("only http(s) URLs with a host")
        if parts.hostname not in allowed_hosts:
            raise ToolError(f"host {parts.hostname!r} is not allowed; allowed: {list(allowed_hosts)}")
        import httpx

        try:
            async with httpx.AsyncClient(follow_redirects=False, timeout=None) as client:
                async with client.stream("GET", args.url) as resp:
                    body = b""
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) >= max_bytes:
                            break
        except httpx.HTTPError as exc:
            raise ToolError(f"fetch failed: {type(exc).__name__}", retryable=True) from None
        if resp.status_code >= 500:
            raise ToolError(f"HTTP {resp.status_code}", retryable=True)
        return {"status": resp.status_code, "body": body[:max_bytes].decode("utf-8", "replace")}

    return fetch

