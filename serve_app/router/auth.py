"""Authentication: btauth/1 (bittensor.http_auth) or Epistula v2 (serve_app/router/epistula.py)
signatures, per subnet (`auth.scheme`), and replay protection shared by every router replica.

`bittensor.http_auth.verify` checks header shape, receiver, freshness and signature,
then asks a nonce store. Its default store lives in one process, so a request replayed
to a second router replica would pass. We let `verify` record the (hotkey, nonce) pair
in a capturing store, then ask one `SharedNonceStore` Ray actor that all replicas use.
Epistula requests are kept in the same store under (signed-by, uuid).
"""

from __future__ import annotations

import asyncio
import heapq
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import bittensor
import ray
from bittensor.http_auth import AuthError, BadSignature, MalformedAuth, ReplayedRequest, StaleRequest, WrongReceiver

from serve_app.config import AuthPolicy
from serve_app.errors import ApiError, ErrorCode, unavailable
from serve_app.router import epistula
from serve_app.router.batching import CallBatcher

# Every Ray cluster's head node offers this resource (amount 1).
HEAD_NODE_RESOURCE = "node:__internal_head__"

AUTH_ERROR_CODES = {
    MalformedAuth: ErrorCode.malformed_auth,
    WrongReceiver: ErrorCode.wrong_receiver,
    StaleRequest: ErrorCode.stale_request,
    ReplayedRequest: ErrorCode.replayed_request,
    BadSignature: ErrorCode.bad_signature,
}


def auth_error(exc: AuthError) -> ApiError:
    # The SDK's messages never echo the signature or payload: safe for the caller.
    code = next((c for cls, c in AUTH_ERROR_CODES.items() if isinstance(exc, cls)), ErrorCode.unauthenticated)
    return ApiError(code, str(exc))


# The store's answers besides a claimant: a nonce signed before it started (it cannot know
# whether it was used), and one whose request was answered.
SIGNED_BEFORE_START = "signed before this store started"
ANSWERED = "answered"


# Headers a scheme may go without (Epistula-Signed-For: validators in the wild sign without a receiver).
OPTIONAL_HEADERS = frozenset({epistula.HEADER_SIGNED_FOR})
# What each scheme's validators send: the header naming the sender (read before the signature, to
# refuse a stranger's key cheaply), and every header a signed request needs (the OpenAPI document).
SCHEME_HEADERS = {
    "btauth": (bittensor.http_auth.HEADER_HOTKEY,
               ["X-Bittensor-Version", "X-Bittensor-Hotkey", "X-Bittensor-Nonce", "X-Bittensor-Signature"]),
    "epistula": (epistula.HEADER_SIGNED_BY, list(epistula.HEADERS)),
}


class NonceWindow:
    """Every accepted (hotkey, nonce) pair, kept for its freshness window: the router replica
    that claimed it while its request is in flight, then ANSWERED. A nonce is btauth/1's
    nanosecond nonce or an Epistula uuid.

    A new store does not know what an earlier one accepted (Ray restarts the actor empty):
    it refuses every nonce signed before its own start plus the clock skew allowed, which
    is all an earlier store could have accepted. Those nonces are stale one window later.
    """

    def __init__(self, started_ns: int | None = None) -> None:
        self._seen: dict[tuple[str, int | str], tuple[str, float]] = {}  # -> (claimant or ANSWERED, claimed at)
        self._expiry: list[tuple[float, tuple[str, int | str]]] = []
        self.started_ns = time.time_ns() if started_ns is None else started_ns

    def check_and_store(self, hotkey: str, nonce: int | str, ttl_s: float, skew_s: float = 0.0,
                        claimant: str = "", signed_at_ns: int | None = None) -> str | None:
        """None: unused, now claimed by `claimant`. Otherwise its claimant while its request is in
        flight, ANSWERED after, or SIGNED_BEFORE_START when an earlier store may have had it.
        `signed_at_ns`: when it was signed (default: the nonce, which for btauth/1 is that time)."""
        if (nonce if signed_at_ns is None else signed_at_ns) < self.started_ns + skew_s * 1e9:
            return SIGNED_BEFORE_START
        now = time.monotonic()
        while self._expiry and self._expiry[0][0] <= now:
            self._seen.pop(heapq.heappop(self._expiry)[1], None)
        key = (hotkey, nonce)
        if key in self._seen:
            return self._seen[key][0]
        self._seen[key] = (claimant, now)
        heapq.heappush(self._expiry, (now + ttl_s, key))
        return None

    def settle(self, hotkey: str, nonce: int | str) -> None:
        """Its request was answered: from now on no one may take the nonce over."""
        key = (hotkey, nonce)
        if key in self._seen:
            self._seen[key] = (ANSWERED, self._seen[key][1])

    def apply_many(self, items: list[tuple]) -> list[str | None]:
        """("claim", hotkey, nonce, ttl_s, skew_s, claimant) -> check_and_store, and ("settle",
        hotkey, nonce) -> settle, in order: one actor call for a router's concurrent requests."""
        return [self.check_and_store(*item[1:]) if item[0] == "claim" else self.settle(*item[1:]) for item in items]

    def take_over(self, hotkey: str, nonce: int | str, gone: str, claimant: str, max_open_s: float) -> bool:
        """Claim a nonce whose claimant `gone` died before answering (HAProxy retried its request
        on another router), if it was claimed less than `max_open_s` ago (the longest a request
        may run); False if it was answered, or someone else took it first."""
        key = (hotkey, nonce)
        held = self._seen.get(key)
        if held is None or held[0] != gone or gone in (ANSWERED, SIGNED_BEFORE_START):
            return False
        if time.monotonic() - held[1] > max_open_s:
            return False
        self._seen[key] = (claimant, held[1])
        return True

    def size(self) -> int:
        return len(self._seen)


# One actor for all router replicas, on the head node: the node a cluster never reaps (a
# worker node's loss would restart it empty, and its start rule would then refuse a window
# of honest requests signed before it).
SharedNonceStore = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0,
                              resources={HEAD_NODE_RESOURCE: 0.001})(NonceWindow)


def shared_nonce_store(miner_name: str):
    """The miner's one store. Detached so that it outlives any router replica that created it."""
    return SharedNonceStore.options(
        name=f"{miner_name}-nonces", namespace="torchrank", get_if_exists=True, lifetime="detached"
    ).remote()


class _Capture:
    """A nonce store for `verify` that only records the pair; the shared store decides."""

    def __init__(self, retention: float):
        self.retention = retention
        self.pair: tuple[str, int] | None = None

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        self.pair = (hotkey_ss58, nonce_ns)
        return True


@dataclass(frozen=True)
class Signed:
    """A request whose signature verified; its nonce is not yet known to be unused."""

    hotkey: str
    nonce: int | str  # btauth/1: its nonce (ns); Epistula: its uuid
    signed_at_ns: int
    policy: AuthPolicy


class Authenticator:
    def __init__(self, self_hotkey_ss58: str, nonce_store, store_timeout_s: float = 2.0, claimant: str = "local",
                 find_store: Callable[[], object] | None = None):
        self.self_hotkey_ss58 = self_hotkey_ss58
        self.nonces = nonce_store
        self._find_store = find_store  # looks the shared store up, or starts it anew (a blocking GCS call)
        self._found_at = 0.0
        self.store_timeout_s = store_timeout_s
        self.claimant = claimant  # this router replica's actor name
        self.store_answered_at = time.monotonic()  # the last time the shared store answered (check_store)
        self.taken_over = 0
        # Concurrent requests' replay checks share one actor call (serve_app/router/batching.py).
        self._store_calls = CallBatcher(lambda items: self.nonces.apply_many.remote(items),
                                        max_concurrent=2, max_items=256)
        self._gone: dict[str, tuple[float, bool]] = {}  # claimant -> (checked at, gone)
        self._to_settle: list[tuple] = []
        self._settler: asyncio.Future | None = None

    @staticmethod
    def claimed_hotkey(headers: Mapping[str, str], policy: AuthPolicy) -> str:
        """The hotkey the request says signed it, not verified yet: only used to refuse. ApiError 401
        when a header the scheme needs is missing or any of its headers is repeated (which copy would
        be the signed one?): before the body is read, as HAProxy's edge does (deployments/haproxy/edge.cfg)."""
        sender, needed = SCHEME_HEADERS[policy.scheme]
        getlist = getattr(headers, "getlist", None)
        for name in needed:
            count = len(getlist(name)) if getlist is not None else int(name in headers)
            if count > 1 or (count == 0 and name not in OPTIONAL_HEADERS):
                raise ApiError(ErrorCode.malformed_auth, f"the {name} header is "
                                                         f"{'repeated' if count else 'missing'}")
        return headers.get(sender, "")

    def verify(self, headers: Mapping[str, str], body: bytes, *, method: str, path: str, policy: AuthPolicy) -> Signed:
        """Header shape, receiver, freshness and signature under the subnet's scheme, without side
        effects; else ApiError 401. The caller authorises the hotkey before `claim` touches the
        shared store. (Epistula signs neither `method` nor `path`.)"""
        if policy.scheme == "epistula":
            try:
                caller = epistula.verify(headers, body, self_hotkey_ss58=self.self_hotkey_ss58,
                                         max_age_s=policy.max_age_s, allowed_skew_s=policy.allowed_skew_s,
                                         require_receiver=policy.require_receiver)
            except AuthError as exc:
                raise auth_error(exc) from None
            return Signed(caller.hotkey, caller.uuid, caller.timestamp_ms * 1_000_000, policy)
        capture = _Capture(retention=policy.max_age_s + policy.allowed_skew_s)
        try:
            caller = bittensor.http_auth.verify(
                headers,
                body,
                method=method,
                path=path,
                self_hotkey_ss58=self.self_hotkey_ss58,
                max_age=policy.max_age_s,
                allowed_skew=policy.allowed_skew_s,
                require_receiver=policy.require_receiver,
                nonce_store=capture,
            )
        except AuthError as exc:
            raise auth_error(exc) from None
        return Signed(caller.hotkey_ss58, caller.nonce_ns, caller.nonce_ns, policy)

    async def claim(self, signed: Signed, max_open_s: float) -> None:
        """Record the nonce in the shared store; ApiError 401 if it was used (503 if the store cannot answer).

        A nonce claimed by a router replica that died before answering, less than `max_open_s`
        ago, may be claimed again: it is HAProxy retrying the request on another router
        (retry-on empty-response), and the caller never got an answer. A nonce answered, or
        still in flight on a live router, is refused. Call `settle` once the request is answered."""
        policy = signed.policy
        item = ("claim", signed.hotkey, signed.nonce, policy.max_age_s + policy.allowed_skew_s,
                policy.allowed_skew_s, self.claimant, signed.signed_at_ns)
        try:
            earlier = await asyncio.wait_for(self._store_calls.submit(item), self.store_timeout_s)
            self.store_answered_at = time.monotonic()
            if earlier not in (None, ANSWERED, SIGNED_BEFORE_START, self.claimant) and await self._is_gone(earlier):
                if await asyncio.wait_for(self.nonces.take_over.remote(signed.hotkey, signed.nonce, earlier,
                                                                       self.claimant, max_open_s),
                                          self.store_timeout_s):
                    self.taken_over += 1
                    return
        except Exception:
            # Fail closed: without the shared store a replay could pass. It may be gone for good: look again.
            asyncio.ensure_future(self.find_store()).add_done_callback(lambda f: f.cancelled() or f.exception())
            raise unavailable("replay protection is temporarily unavailable", retry_after_s=2) from None
        if earlier == SIGNED_BEFORE_START:
            # An honest request signed moments before a store restart lands here too: a retry, signed afresh, passes.
            raise unavailable("the miner's replay store (re)started moments ago and cannot tell whether this nonce "
                              "was used: sign the request again", retry_after_s=max(1.0, policy.allowed_skew_s))
        if earlier is not None:
            raise auth_error(ReplayedRequest("this nonce was already accepted from this hotkey"))

    async def find_store(self) -> None:
        """Look the shared store up again, started anew if it is gone for good (Ray does not restart
        an actor killed for good, nor one whose node is lost); at most once every STORE_REFIND_S."""
        if self._find_store is None or time.monotonic() - self._found_at < STORE_REFIND_S:
            return
        self._found_at = time.monotonic()
        self.nonces = await asyncio.wait_for(asyncio.to_thread(self._find_store), self.store_timeout_s)

    async def wait_for_store(self, timeout_s: float) -> bool:
        """At the router's start: wait until the store answers (a store started just now takes
        seconds to come up, on a busy host more than a request's store_timeout_s), so the first
        validators after a start are not refused with 503. False if it did not answer in time:
        the router starts anyway and requests fail closed until it does."""
        try:
            await asyncio.wait_for(self.nonces.size.remote(), timeout_s)
        except Exception:
            return False
        self.store_answered_at = time.monotonic()
        return True

    async def check_store(self) -> None:
        """For the router's health check. A store quiet for STORE_QUIET_S is asked; one that does
        not answer is looked up again (started anew if it is gone for good). Raises only when that
        too has failed for STORE_UNREACHABLE_S: a store that is merely slow must not get every
        router replaced at once."""
        if time.monotonic() - self.store_answered_at < STORE_QUIET_S:
            return
        try:
            await asyncio.wait_for(self.nonces.size.remote(), self.store_timeout_s)
            self.store_answered_at = time.monotonic()
            return
        except Exception:
            silent_s = time.monotonic() - self.store_answered_at
        try:
            await self.find_store()
        except Exception:
            if silent_s > STORE_UNREACHABLE_S:
                raise RuntimeError(f"the shared replay store has not answered for {silent_s:.0f}s and cannot be "
                                   f"found or started again") from None

    def settle(self, signed: Signed) -> None:
        """The claimed request was answered (whatever the answer): its nonce can no longer be taken
        over. Sent with the others every SETTLE_EVERY_S, in one store call; nothing waits for it."""
        self._to_settle.append(("settle", signed.hotkey, signed.nonce))
        if self._settler is None or self._settler.done():
            self._settler = asyncio.ensure_future(self._settle_soon())

    async def _settle_soon(self) -> None:
        await asyncio.sleep(SETTLE_EVERY_S)
        items, self._to_settle = self._to_settle, []
        try:
            await asyncio.wait_for(self.nonces.apply_many.remote(items), self.store_timeout_s)
        except Exception:
            pass  # a lost settle only leaves a nonce open to take-over until it expires

    async def _is_gone(self, claimant: str) -> bool:
        """Is this router replica dead? Asked of Ray's GCS at most once a second per replica; a
        replica just killed may still look alive for a moment, so one that does is asked again."""
        now = time.monotonic()
        checked = self._gone.get(claimant)
        if checked is not None and now - checked[0] < GONE_CHECK_S:
            return checked[1]
        gone = await asyncio.to_thread(_actor_gone, claimant)
        if not gone:
            await asyncio.sleep(GONE_RECHECK_S)
            gone = await asyncio.to_thread(_actor_gone, claimant)
        self._gone = {name: v for name, v in self._gone.items() if now - v[0] < GONE_CHECK_S}
        self._gone[claimant] = (time.monotonic(), gone)
        return gone


STORE_REFIND_S = 2.0
# The health check asks a store this long without an answer; one silent longer fails it.
STORE_QUIET_S = 5.0
STORE_START_S = 60.0  # how long a starting router waits for the store to answer
STORE_UNREACHABLE_S = 30.0
SETTLE_EVERY_S = 0.1  # answered nonces reach the store in one call this often (not one call per request)
GONE_CHECK_S = 1.0
GONE_RECHECK_S = 0.2


def _actor_gone(name: str) -> bool:
    """No live actor by this name (router replicas are named actors in Serve's namespace)."""
    if not ray.is_initialized():
        return False  # outside Ray (unit tests): nothing can be known gone
    try:
        ray.get_actor(name, namespace="serve")
        return False
    except ValueError:
        return True
