"""Authentication: btauth/1 signatures (bittensor.http_auth) and replay protection
shared by every router replica.

`bittensor.http_auth.verify` checks header shape, receiver, freshness and signature,
then asks a nonce store. Its default store lives in one process, so a request replayed
to a second router replica would pass. We let `verify` record the (hotkey, nonce) pair
in a capturing store, then ask one `SharedNonceStore` Ray actor that all replicas use.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from typing import Mapping

import bittensor
import ray
from bittensor.http_auth import AuthError, BadSignature, MalformedAuth, ReplayedRequest, StaleRequest, WrongReceiver

from serve_app.config import AuthPolicy
from serve_app.errors import ApiError, unavailable
from serve_app.router.batching import CallBatcher

AUTH_ERROR_CODES = {
    MalformedAuth: "malformed_auth",
    WrongReceiver: "wrong_receiver",
    StaleRequest: "stale_request",
    ReplayedRequest: "replayed_request",
    BadSignature: "bad_signature",
}


def auth_error(exc: AuthError) -> ApiError:
    # The SDK's messages never echo the signature or payload: safe for the caller.
    code = next((c for cls, c in AUTH_ERROR_CODES.items() if isinstance(exc, cls)), "unauthenticated")
    return ApiError(401, code, str(exc))


class NonceWindow:
    """Every accepted (hotkey, nonce) pair, kept for its freshness window."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, int]] = set()
        self._expiry: list[tuple[float, tuple[str, int]]] = []

    def check_and_store(self, hotkey: str, nonce: int, ttl_s: float) -> bool:
        now = time.monotonic()
        while self._expiry and self._expiry[0][0] <= now:
            self._seen.discard(heapq.heappop(self._expiry)[1])
        key = (hotkey, nonce)
        if key in self._seen:
            return False
        self._seen.add(key)
        heapq.heappush(self._expiry, (now + ttl_s, key))
        return True

    def check_and_store_many(self, entries: list[tuple[str, int, float]]) -> list[bool]:
        """check_and_store for each (hotkey, nonce, ttl_s), in order: one actor call for a router's concurrent requests."""
        return [self.check_and_store(hotkey, nonce, ttl_s) for hotkey, nonce, ttl_s in entries]

    def size(self) -> int:
        return len(self._seen)


# One actor for all router replicas. A restart empties it: replays of requests
# accepted in the last window would pass then, so keep it on the head node.
SharedNonceStore = ray.remote(num_cpus=0, max_restarts=-1)(NonceWindow)


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


class Authenticator:
    def __init__(self, self_hotkey_ss58: str, nonce_store, store_timeout_s: float = 2.0):
        self.self_hotkey_ss58 = self_hotkey_ss58
        self.nonces = nonce_store
        self.store_timeout_s = store_timeout_s
        # Concurrent requests' replay checks share one actor call (serve_app/router/batching.py).
        self._replay_checks = CallBatcher(lambda entries: self.nonces.check_and_store_many.remote(entries),
                                          max_concurrent=2, max_items=256)

    async def authenticate(
        self, headers: Mapping[str, str], body: bytes, *, method: str, path: str, policy: AuthPolicy
    ) -> str:
        """The caller's hotkey, or ApiError 401 (503 if the replay store cannot answer)."""
        window = policy.max_age_s + policy.allowed_skew_s
        capture = _Capture(retention=window)
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
        try:
            fresh = await asyncio.wait_for(
                self._replay_checks.submit((caller.hotkey_ss58, caller.nonce_ns, window)), self.store_timeout_s
            )
        except Exception:
            # Fail closed: without the shared store a replay could pass.
            raise unavailable("replay protection is temporarily unavailable", retry_after_s=2) from None
        if not fresh:
            raise auth_error(ReplayedRequest("this nonce was already accepted from this hotkey"))
        return caller.hotkey_ss58
