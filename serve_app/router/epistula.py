"""Epistula v2: the signed-request headers several subnets' validators send instead of btauth/1.

As macrocosm-os/prompting (shared/epistula.py) and subtrahend-labs/gobt define it:
  Epistula-Version: 2, Epistula-Timestamp (Unix ms), Epistula-Uuid, Epistula-Signed-By
  (the sender's ss58), Epistula-Signed-For (the receiver's ss58), Epistula-Request-Signature
  ("0x" + hex of an sr25519 signature over the UTF-8 string
  f"{sha256(body).hexdigest()}.{uuid}.{timestamp}.{signed_for}").
The method and path are not signed: a signed body is valid on every route of this miner
(the replay store still accepts its uuid once). The Epistula-Secret-Signature-* headers
are ignored: implementations disagree on what they sign.

Failures raise the SDK's btauth/1 error classes, so both schemes answer with the same
error codes. Nothing here touches the replay store: Authenticator.claim does, after
authorisation, with (signed-by, uuid) as the key.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from typing import Mapping, Optional

from bittensor.http_auth import BadSignature, MalformedAuth, StaleRequest, WrongReceiver
from bittensor.sp_core import CRYPTO_SR25519
from bittensor.sp_core import verify as sr25519_verify

VERSION = "2"
HEADER_VERSION = "Epistula-Version"
HEADER_TIMESTAMP = "Epistula-Timestamp"
HEADER_UUID = "Epistula-Uuid"
HEADER_SIGNED_BY = "Epistula-Signed-By"
HEADER_SIGNED_FOR = "Epistula-Signed-For"
HEADER_SIGNATURE = "Epistula-Request-Signature"
HEADERS = (HEADER_VERSION, HEADER_TIMESTAMP, HEADER_UUID, HEADER_SIGNED_BY, HEADER_SIGNED_FOR, HEADER_SIGNATURE)

TIMESTAMP = re.compile(r"^[0-9]{1,16}$")
# Implementations send uuid4 text; any short visible token is accepted (it is signed, and the
# replay store keeps it for the freshness window: the length bounds what a sender can make it hold).
UUID = re.compile(r"^[\x21-\x7e]{1,128}$")
SIGNATURE = re.compile(r"^0x[0-9a-fA-F]{128}$")


@dataclass(frozen=True)
class EpistulaCaller:
    hotkey: str
    uuid: str
    timestamp_ms: int


def message(body: bytes, uuid: str, timestamp: str, signed_for: str) -> bytes:
    """The bytes the sender signs (its Signed-For, or "" when the request names no receiver)."""
    return f"{hashlib.sha256(body).hexdigest()}.{uuid}.{timestamp}.{signed_for}".encode()


def _signature_verifies(data: bytes, signature: bytes, sender: str) -> bool:
    # substrate-interface's Keypair.verify, which the reference implementation uses, also accepts
    # a signature over "<Bytes>...</Bytes>" (what the Polkadot.js extension signs): so do we.
    return (sr25519_verify(data, signature, sender, CRYPTO_SR25519)
            or sr25519_verify(b"<Bytes>" + data + b"</Bytes>", signature, sender, CRYPTO_SR25519))


def verify(headers: Mapping[str, str], body: bytes, *, self_hotkey_ss58: str, max_age_s: float,
           allowed_skew_s: float, require_receiver: bool, now_ms: Optional[int] = None) -> EpistulaCaller:
    """Header shape, receiver, freshness, then the signature (the cheap checks first)."""
    lowered = {key.lower(): value for key, value in headers.items()}

    def header(name: str) -> str:
        value = lowered.get(name.lower())
        if not value:
            raise MalformedAuth(f"missing {name}")
        return value

    if header(HEADER_VERSION) != VERSION:
        raise MalformedAuth(f"unsupported {HEADER_VERSION} (expected {VERSION!r})")
    timestamp = header(HEADER_TIMESTAMP)
    if not TIMESTAMP.match(timestamp):
        raise MalformedAuth(f"{HEADER_TIMESTAMP} is not Unix milliseconds")
    uuid = header(HEADER_UUID)
    if not UUID.match(uuid):
        raise MalformedAuth(f"{HEADER_UUID} is not a token of 1-128 visible characters")
    sender = header(HEADER_SIGNED_BY)
    raw_signature = header(HEADER_SIGNATURE)
    if not SIGNATURE.match(raw_signature):
        raise MalformedAuth(f"{HEADER_SIGNATURE} is not 0x and 64 bytes of hex")

    receiver = lowered.get(HEADER_SIGNED_FOR.lower()) or ""
    if not receiver:
        if require_receiver:
            raise WrongReceiver(f"missing {HEADER_SIGNED_FOR}: this subnet requires requests signed for this miner")
    elif receiver != self_hotkey_ss58:
        raise WrongReceiver("request was signed for a different receiving hotkey")

    now = round(time.time() * 1000) if now_ms is None else now_ms
    signed_at = int(timestamp)
    if now - signed_at > max_age_s * 1000:
        raise StaleRequest(f"{HEADER_TIMESTAMP} is older than the {max_age_s:g}s freshness window")
    if signed_at - now > allowed_skew_s * 1000:
        raise StaleRequest(f"{HEADER_TIMESTAMP} is more than {allowed_skew_s:g}s in the future")

    # The timestamp exactly as sent: it is what the sender formatted and signed.
    data = message(body, uuid, timestamp, receiver)
    try:
        valid = _signature_verifies(data, bytes.fromhex(raw_signature[2:]), sender)
    except ValueError:
        raise MalformedAuth(f"{HEADER_SIGNED_BY} is not an ss58 address") from None
    if not valid:
        raise BadSignature("signature does not verify against the claimed hotkey")
    return EpistulaCaller(hotkey=sender, uuid=uuid, timestamp_ms=signed_at)
