"""Epistula v2 verification with real sr25519 signatures (bittensor.sp_core.Keypair), signed here
exactly as the spec says rather than with the miner's own client, through the Authenticator
(the shared replay actor replaced by the same NonceWindow in-process, as in test_auth.py)."""

import asyncio
import hashlib
import time
import uuid

import pytest
from bittensor.sp_core import Keypair

from serve_app.client import signed_request
from serve_app.config import AuthPolicy
from serve_app.errors import ApiError, ErrorCode
from serve_app.router.auth import Authenticator
from tests.unit.test_auth import InProcessStore

ALICE = Keypair.create_from_uri("//Alice")
MINER = Keypair.create_from_uri("//Bob").ss58_address
OTHER_MINER = Keypair.create_from_uri("//Charlie").ss58_address
BODY = b'{"input": "hi"}'
EPISTULA = AuthPolicy(scheme="epistula", max_age_s=8)


def epistula(body=BODY, signed_for=MINER, timestamp=None, request_id=None, key=ALICE, wrap=False):
    timestamp = str(round(time.time() * 1000)) if timestamp is None else str(timestamp)
    request_id = request_id or str(uuid.uuid4())
    message = f"{hashlib.sha256(body).hexdigest()}.{request_id}.{timestamp}.{signed_for or ''}"
    data = f"<Bytes>{message}</Bytes>" if wrap else message
    headers = {"Epistula-Version": "2", "Epistula-Timestamp": timestamp, "Epistula-Uuid": request_id,
               "Epistula-Signed-By": key.ss58_address,
               "Epistula-Request-Signature": "0x" + bytes(key.sign(data.encode())).hex()}
    if signed_for:
        headers["Epistula-Signed-For"] = signed_for
    return headers


def authenticate(headers, body=BODY, policy=EPISTULA, auth=None, path="/v1/embeddings"):
    auth = auth or Authenticator(MINER, InProcessStore())
    signed = auth.verify(headers, body, method="POST", path=path, policy=policy)
    asyncio.run(auth.claim(signed, max_open_s=60))
    return signed.hotkey


def refusal(headers, **kw):
    with pytest.raises(ApiError) as err:
        authenticate(headers, **kw)
    return err.value.status, err.value.code.value


def test_a_valid_request_names_its_sender():
    assert authenticate(epistula()) == ALICE.ss58_address


def test_the_claimed_hotkey_is_read_from_signed_by():
    assert Authenticator.claimed_hotkey(epistula(), EPISTULA) == ALICE.ss58_address
    with pytest.raises(ApiError) as refused:  # btauth/1 needs its own headers
        Authenticator.claimed_hotkey(epistula(), AuthPolicy())
    assert refused.value.code is ErrorCode.malformed_auth


def test_a_replayed_uuid_is_refused_across_routes():
    # Epistula signs neither method nor path: the store is what stops a second use on another route.
    auth = Authenticator(MINER, InProcessStore())
    headers = epistula()
    assert authenticate(headers, auth=auth) == ALICE.ss58_address
    assert refusal(headers, auth=auth) == (401, "replayed_request")
    assert refusal(headers, auth=auth, path="/v1/agents/runs") == (401, "replayed_request")
    assert authenticate(epistula(), auth=auth) == ALICE.ss58_address  # a fresh uuid passes


def test_the_same_uuid_from_another_sender_is_its_own():
    auth = Authenticator(MINER, InProcessStore())
    request_id = str(uuid.uuid4())
    assert authenticate(epistula(request_id=request_id), auth=auth) == ALICE.ss58_address
    charlie = Keypair.create_from_uri("//Charlie")
    assert authenticate(epistula(request_id=request_id, key=charlie), auth=auth) == charlie.ss58_address


def test_a_tampered_body_or_header_is_a_bad_signature():
    assert refusal(epistula(), body=b'{"input": "other"}') == (401, "bad_signature")
    headers = epistula()
    headers["Epistula-Uuid"] = str(uuid.uuid4())
    assert refusal(headers) == (401, "bad_signature")
    headers = epistula()
    headers["Epistula-Timestamp"] = str(int(headers["Epistula-Timestamp"]) - 1)
    assert refusal(headers) == (401, "bad_signature")
    headers = epistula()
    headers["Epistula-Signed-By"] = Keypair.create_from_uri("//Dave").ss58_address
    assert refusal(headers) == (401, "bad_signature")


def test_stale_and_future_timestamps():
    now = round(time.time() * 1000)
    assert refusal(epistula(timestamp=now - 9_000)) == (401, "stale_request")  # 8 s window
    assert authenticate(epistula(timestamp=now - 5_000)) == ALICE.ss58_address
    assert refusal(epistula(timestamp=now + 5_000)) == (401, "stale_request")  # 2 s of skew
    assert authenticate(epistula(timestamp=now + 1_000)) == ALICE.ss58_address
    # The window is the subnet's.
    assert authenticate(epistula(timestamp=now - 9_000), policy=EPISTULA.model_copy(update={"max_age_s": 30}))


def test_the_receiver_must_be_this_miner():
    assert refusal(epistula(signed_for=OTHER_MINER)) == (401, "wrong_receiver")
    assert refusal(epistula(signed_for=None)) == (401, "wrong_receiver")
    lenient = EPISTULA.model_copy(update={"require_receiver": False})
    # Unbound requests sign an empty receiver; one bound to another miner stays refused.
    assert authenticate(epistula(signed_for=None), policy=lenient) == ALICE.ss58_address
    assert refusal(epistula(signed_for=OTHER_MINER), policy=lenient) == (401, "wrong_receiver")


@pytest.mark.parametrize("name", ["Epistula-Version", "Epistula-Timestamp", "Epistula-Uuid", "Epistula-Signed-By",
                                  "Epistula-Request-Signature"])
def test_each_missing_header_is_named(name):
    headers = epistula()
    del headers[name]
    with pytest.raises(ApiError) as err:
        authenticate(headers)
    assert err.value.code.value == "malformed_auth" and name in err.value.detail


def test_malformed_headers():
    for name, value in [("Epistula-Version", "1"), ("Epistula-Timestamp", "soon"), ("Epistula-Timestamp", "-5"),
                        ("Epistula-Uuid", "a b"), ("Epistula-Uuid", "x" * 129),
                        ("Epistula-Request-Signature", "abcd"), ("Epistula-Request-Signature", "0x" + "zz" * 64),
                        ("Epistula-Signed-By", "not-an-address")]:
        headers = epistula()
        headers[name] = value
        assert refusal(headers) == (401, "malformed_auth"), (name, value)


def test_header_names_are_case_insensitive_and_secret_signatures_ignored():
    headers = {k.lower(): v for k, v in epistula().items()}
    headers["Epistula-Secret-Signature-0"] = "0x" + "00" * 64  # implementations disagree on these
    assert authenticate(headers) == ALICE.ss58_address


def test_a_polkadot_js_wrapped_signature_verifies():
    assert authenticate(epistula(wrap=True)) == ALICE.ss58_address


def test_a_request_signed_before_a_store_restart_is_refused_until_signed_again():
    now_ms = round(time.time() * 1000)
    store = InProcessStore(started_ns=(now_ms - 5_000) * 1_000_000)  # (re)started 5 s ago, empty
    # Signed before it started (+ the skew): an earlier store may have accepted this uuid.
    assert refusal(epistula(timestamp=now_ms - 6_000), auth=Authenticator(MINER, store)) == (503, "unavailable")
    assert authenticate(epistula(timestamp=now_ms - 1_000), auth=Authenticator(MINER, store))


def test_the_miners_own_client_signs_what_the_miner_verifies():
    body, headers = signed_request(ALICE, "/v1/embeddings", {"input": "hi"}, MINER, scheme="epistula")
    assert authenticate(headers, body=body) == ALICE.ss58_address
    assert refusal(headers, body=body, policy=AuthPolicy()) == (401, "malformed_auth")  # a btauth subnet
