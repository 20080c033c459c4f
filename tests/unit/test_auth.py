"""btauth/1 verification with real signatures from the bittensor SDK.

The shared Ray actor is replaced by the same NonceWindow logic in-process: that actor
is the one thing isolated here (tests/serve proves it across two router replicas).
"""

import asyncio
from types import SimpleNamespace
import time

import bittensor
import pytest
from bittensor.sp_core import Keypair

from serve_app.config import AuthPolicy
from serve_app.errors import ApiError
from serve_app.router.auth import ANSWERED, Authenticator, NonceWindow

ALICE = Keypair.create_from_uri("//Alice")
MINER = Keypair.create_from_uri("//Bob").ss58_address
OTHER_MINER = Keypair.create_from_uri("//Charlie").ss58_address
PATH = "/v1/embeddings"
BODY = b'{"input": "hi"}'


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)

        return call()


class InProcessStore:
    def __init__(self, fail=False, started_ns=0):
        self.window = NonceWindow(started_ns)
        self.apply_many = _Method(self._boom if fail else self.window.apply_many)
        self.take_over = _Method(self.window.take_over)

    @staticmethod
    def _boom(*args):
        raise ConnectionError("actor died")


def authenticate(headers, body=BODY, path=PATH, policy=AuthPolicy(), store=None):
    auth = Authenticator(MINER, store or InProcessStore())
    signed = auth.verify(headers, body, method="POST", path=path, policy=policy)
    asyncio.run(auth.claim(signed, max_open_s=60))
    return signed.hotkey


def signed(receiver=MINER, nonce_ns=None, body=BODY, path=PATH):
    return bittensor.http_auth.sign(ALICE, method="POST", path=path, body=body, receiver_ss58=receiver, nonce_ns=nonce_ns)


def refusal(**kw):
    with pytest.raises(ApiError) as err:
        authenticate(**kw)
    return err.value.status, err.value.code


def test_valid_signature_names_the_caller():
    assert authenticate(signed()) == ALICE.ss58_address


def test_missing_and_malformed_headers():
    assert refusal(headers={}) == (401, "malformed_auth")
    h = signed()
    h["X-Bittensor-Signature"] = "0xnothex"
    assert refusal(headers=h) == (401, "malformed_auth")
    h = signed()
    h["X-Bittensor-Nonce"] = "soon"
    assert refusal(headers=h) == (401, "malformed_auth")


def test_tampered_body_or_path_is_a_bad_signature():
    assert refusal(headers=signed(), body=b'{"input": "other"}') == (401, "bad_signature")
    assert refusal(headers=signed(), path="/v1/embeddings?x=1") == (401, "bad_signature")


def test_receiver_binding():
    assert refusal(headers=signed(receiver=OTHER_MINER)) == (401, "wrong_receiver")
    assert refusal(headers=signed(receiver=None)) == (401, "wrong_receiver")
    # Subnets whose validators sign without a receiver turn the requirement off.
    assert authenticate(signed(receiver=None), policy=AuthPolicy(require_receiver=False)) == ALICE.ss58_address


def test_freshness_window_is_per_subnet():
    old = time.time_ns() - 60 * 10**9
    assert refusal(headers=signed(nonce_ns=old)) == (401, "stale_request")
    assert authenticate(signed(nonce_ns=old), policy=AuthPolicy(max_age_s=120)) == ALICE.ss58_address
    future = time.time_ns() + 30 * 10**9
    assert refusal(headers=signed(nonce_ns=future)) == (401, "stale_request")


def test_replay_is_refused():
    store = InProcessStore()
    h = signed()
    assert authenticate(h, store=store) == ALICE.ss58_address
    assert refusal(headers=h, store=store) == (401, "replayed_request")


def test_store_outage_fails_closed():
    assert refusal(headers=signed(), store=InProcessStore(fail=True)) == (503, "unavailable")


def test_a_starting_router_waits_for_a_store_that_is_still_starting():
    class StartingStore(InProcessStore):
        def __init__(self, up_after_s):
            super().__init__()
            self.up_at = time.monotonic() + up_after_s

            async def size():
                await asyncio.sleep(max(0.0, self.up_at - time.monotonic()))
                return self.window.size()

            self.size = SimpleNamespace(remote=size)

    auth = Authenticator(MINER, StartingStore(0.3))  # up after longer than a request's store_timeout_s
    auth.store_timeout_s = 0.1
    started = time.monotonic()
    assert asyncio.run(auth.wait_for_store(5.0)) and time.monotonic() - started >= 0.3
    assert not asyncio.run(Authenticator(MINER, StartingStore(5.0)).wait_for_store(0.2))


def test_nonce_window_forgets_after_its_ttl():
    window = NonceWindow(started_ns=0)
    assert window.check_and_store("hk", 1, 0.05, 0, "router-a") is None
    assert window.check_and_store("hk", 1, 0.05, 0, "router-b") == "router-a"
    time.sleep(0.06)
    assert window.check_and_store("hk", 1, 0.05, 0, "router-b") is None
    assert window.size() == 1


def test_verify_has_no_side_effects_on_the_store():
    # A self-made key with a valid signature must not cost a store entry before it is authorised.
    store = InProcessStore()
    auth = Authenticator(MINER, store)
    h = signed()
    auth.verify(h, BODY, method="POST", path=PATH, policy=AuthPolicy())
    auth.verify(h, BODY, method="POST", path=PATH, policy=AuthPolicy())
    assert authenticate(h, store=store) == ALICE.ss58_address  # first claim: still fresh


def test_a_new_store_refuses_what_was_signed_before_it_started():
    # Ray restarts the store empty: a request its predecessor accepted must not pass again.
    # It cannot tell a replay from an honest request signed just before: 503, sign again.
    now = time.time_ns()
    store = InProcessStore(started_ns=now - 3 * 10**9)  # (re)started 3 s ago; allowed skew 2 s
    assert refusal(headers=signed(nonce_ns=now - 4 * 10**9), store=store) == (503, "unavailable")
    # Signed 1 s after the start by a clock up to 2 s ahead: its predecessor may have accepted it.
    assert refusal(headers=signed(nonce_ns=now - 2 * 10**9), store=store) == (503, "unavailable")
    assert authenticate(signed(), store=store) == ALICE.ss58_address


def test_a_nonce_whose_router_died_in_flight_may_be_claimed_once_by_another():
    # HAProxy retries a request whose router died mid-call on the other router: the caller never
    # got an answer, so the nonce moves to the new claimant; only once, and never from a live one.
    window = NonceWindow(started_ns=0)
    assert window.check_and_store("hk", 7, 10, 0, "router-a") is None
    assert window.check_and_store("hk", 7, 10, 0, "router-b") == "router-a"
    assert window.take_over("hk", 7, "router-a", "router-b", max_open_s=60)
    assert not window.take_over("hk", 7, "router-a", "router-c", max_open_s=60)  # router-b has it now
    assert window.check_and_store("hk", 7, 10, 0, "router-c") == "router-b"
    assert not window.take_over("hk", 8, "router-a", "router-b", max_open_s=60)  # never claimed


def test_an_answered_or_old_claim_is_never_taken_over():
    window = NonceWindow(started_ns=0)
    window.check_and_store("hk", 1, 10, 0, "router-a")
    window.apply_many([("settle", "hk", 1)])  # router-a answered it, then went away
    assert window.check_and_store("hk", 1, 10, 0, "router-b") == ANSWERED
    assert not window.take_over("hk", 1, "router-a", "router-b", max_open_s=60)
    assert not window.take_over("hk", 1, ANSWERED, "router-b", max_open_s=60)
    window.check_and_store("hk", 2, 10, 0, "router-a")
    time.sleep(0.02)
    assert not window.take_over("hk", 2, "router-a", "router-b", max_open_s=0.01)  # older than any request runs


def claim_at(auth, headers):
    return asyncio.run(auth.claim(auth.verify(headers, BODY, method="POST", path=PATH, policy=AuthPolicy()),
                                  max_open_s=60))


def test_the_router_takes_over_only_from_a_router_that_is_gone(monkeypatch):
    # Ray's GCS is what is isolated here: whether a router replica's actor still lives.
    from serve_app.router import auth as auth_module

    alive = {"router-a"}
    monkeypatch.setattr(auth_module, "_actor_gone", lambda name: name not in alive)
    monkeypatch.setattr(auth_module, "GONE_RECHECK_S", 0.0)
    store = InProcessStore()
    a, b = Authenticator(MINER, store, claimant="router-a"), Authenticator(MINER, store, claimant="router-b")
    h = signed()
    claim_at(a, h)
    with pytest.raises(ApiError) as err:
        claim_at(b, h)  # a replay while router-a lives, its request in flight
    assert (err.value.status, err.value.code) == (401, "replayed_request")
    alive.clear()  # router-a dies before answering: HAProxy's retry reaches b
    b._gone.clear()
    claim_at(b, h)
    assert b.taken_over == 1
    # Answered by b, then b is gone too: a replay of it stays refused.
    asyncio.run(_settled(b, h))
    c = Authenticator(MINER, store, claimant="router-c")
    with pytest.raises(ApiError) as err:
        claim_at(c, h)
    assert (err.value.status, err.value.code) == (401, "replayed_request")


async def _settled(auth, headers):
    auth.settle(auth.verify(headers, BODY, method="POST", path=PATH, policy=AuthPolicy()))
    await asyncio.sleep(0.2)  # settles reach the store every SETTLE_EVERY_S
