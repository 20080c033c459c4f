"""The agent's built-in tools: typed arguments, a timeout each, retries for retryable failures.

A tool is an async function of a validated pydantic model. A validation error, an unknown
tool or a failure comes back to the model as the step's `error` (it can correct itself);
only the run's own deadline ends a run early. Tools run on the replica's event loop or
elsewhere (the embeddings deployment, the network, a child process), never on the model's
thread, so a slow tool never idles the model for other sessions.

A timeout must really stop a tool: awaiting I/O (retrieve, http_fetch) is cancelled, but
pure-Python CPU work on the loop or in a thread cannot be interrupted, so the calculator
runs in a child process (ToolProcess) that is killed when a call overruns. The scratchpad
is a dict lookup on the run's own state: it stays on the loop.

Results are made JSON-safe here (errors.json_safe), once for every tool: the trace goes
back to the validator through orjson, which refuses integers beyond 64 bits.
"""

from __future__ import annotations

import asyncio
import ipaddress
import pickle
import random
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.agents.calculator import CalcError, Calculator
from serve_app.config import FETCH_DEFAULT_PORTS, FetchToolConfig
from serve_app.errors import json_safe
from serve_app.inference import process

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


class ToolProcess:
    """An engine's methods run in a child process, awaited from the event loop, so that a
    timeout really stops them: a call that does not finish (its timeout, the run's
    cancellation) kills the child, and the next call starts a fresh one.

    The child speaks serve_app/inference/process.py's protocol; it starts at the first call
    (a fresh interpreter: cheap next to a tool's timeout; figure in benchmarks/README.md) and
    serves one call at a time (others wait their turn, within their timeout).
    """

    def __init__(self, engine_cls: type):
        self.engine_cls = engine_cls
        self._proc: Optional[subprocess.Popen] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._lock: Optional[asyncio.Lock] = None

    async def call(self, method: str, *args):
        async with self._turn():
            if self._proc is None:
                self._proc = process.spawn()
                try:
                    await self._request(("__init__", (self.engine_cls.__module__, self.engine_cls.__qualname__, ())))
                except BaseException:
                    self.close()
                    raise
            return await self._request((method, args))

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()  # reaped at once: SIGKILL cannot be ignored
            proc.stdin.close()
            proc.stdout.close()

    def _turn(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # an asyncio.Lock belongs to one loop (tests run several)
            self._loop, self._lock = loop, asyncio.Lock()
        return self._lock

    async def _request(self, message):
        proc = self._proc
        try:
            process.send_message(proc.stdin, message)
            await _readable(proc.stdout.fileno())
            status, value = process.read_message(proc.stdout)  # the reply is one small write: read at once
        except BaseException as exc:
            self.close()  # cancelled or broken mid-call: the child may still be computing, never reuse it
            if isinstance(exc, (EOFError, OSError, pickle.UnpicklingError)):
                raise ToolError(f"the tool's process failed: {exc}") from None
            raise
        if status == "error":
            raise value
        return value


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


CALCULATOR = ToolProcess(Calculator)  # one child per replica process, started at the first call


async def calculator(args: CalculatorArgs, session: Session) -> object:
    try:
        return await CALCULATOR.call("evaluate", args.expression)
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
            return json_safe(await asyncio.wait_for(tool.run(args, session), tool.timeout_s))
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


def is_public_address(address: str) -> bool:
    """Whether `address` (IPv4 or IPv6 text) is a public unicast address: not private, loopback,
    link-local, multicast, reserved, unspecified, shared (100.64/10) or documentation space.
    IPv6 forms that carry an IPv4 address (mapped ::ffff:a.b.c.d, 6to4) are judged by it."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return is_public_address(str(ip.ipv4_mapped))
        if ip.sixtofour is not None and not is_public_address(str(ip.sixtofour)):
            return False
        if ip.is_site_local:  # deprecated fec0::/10, which Python still counts as global
            return False
    # is_global alone is not enough on Python 3.11 (multicast and 64:ff9b::/96 count as global).
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


async def _resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def make_fetch(allowed_hosts: tuple[str, ...], max_bytes: int = 65536, *,
               resolve: Callable[[str, int], Awaitable[list[str]]] = _resolve,
               allow_address: Callable[[str], bool] = is_public_address) -> Callable:
    """The `http_fetch` tool: GET from the allow-listed origins only, at public addresses, bounded.

    Each entry is a (scheme, host, port) origin (FetchToolConfig.allowed_hosts: a bare host
    means https on 443). The host is resolved once and every address it has must be public;
    the request then goes to the first one, the name sent in Host and TLS SNI (the
    certificate is checked against the name), so DNS cannot answer differently between the
    check and the connection. No redirect is followed: the answer carries its `location`,
    which the model may fetch, checked like any URL. Proxies and .netrc in the environment
    are ignored. `resolve` and `allow_address` are for tests; no config reaches them.
    """
    allowed = {FetchToolConfig.origin(entry) for entry in allowed_hosts}
    listed = sorted(FetchToolConfig.origin_text(*origin) for origin in allowed)

    async def fetch(args: FetchArgs, session: Session) -> object:
        import httpx

        try:
            url = httpx.URL(args.url)
        except httpx.InvalidURL as exc:
            raise ToolError(f"not a URL: {exc}") from None
        if url.scheme not in FETCH_DEFAULT_PORTS or not url.raw_host:
            raise ToolError("only http(s) URLs with a host")
        if url.userinfo:
            raise ToolError("credentials in the URL are not allowed")
        host = url.raw_host.decode("ascii")  # IDNA-encoded, lower case: what DNS and TLS see
        origin = (url.scheme, host, url.port or FETCH_DEFAULT_PORTS[url.scheme])
        if origin not in allowed:
            raise ToolError(f"{FetchToolConfig.origin_text(*origin)} is not allowed; allowed: {listed}")
        try:
            addresses = await resolve(host, origin[2])
        except OSError as exc:
            raise ToolError(f"cannot resolve {host!r}: {exc}", retryable=True) from None
        refused = [address for address in addresses if not allow_address(address)]
        if refused or not addresses:
            raise ToolError(f"{host!r} resolves to {refused[0] if refused else 'nothing'}: not a public address")
        address = ipaddress.ip_address(addresses[0])
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        pinned = url.copy_with(host=str(address))  # the address checked, with the name in Host and SNI
        headers = {"Host": url.netloc.decode("ascii")}
        extensions = {"sni_hostname": host} if url.scheme == "https" else {}
        try:
            async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=None) as client:
                async with client.stream("GET", pinned, headers=headers, extensions=extensions) as resp:
                    body = b""
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) >= max_bytes:
                            break
        except httpx.HTTPError as exc:
            raise ToolError(f"fetch failed: {type(exc).__name__}", retryable=True) from None
        if resp.status_code >= 500:
            raise ToolError(f"HTTP {resp.status_code}", retryable=True)
        result = {"status": resp.status_code, "body": body[:max_bytes].decode("utf-8", "replace")}
        if resp.is_redirect:
            result["location"] = resp.headers["location"]
        return result

    return fetch
