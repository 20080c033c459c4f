"""A validator's side of the wire: sign a request with btauth/1 or Epistula v2 and send it.

Used by the `torchrank-miner validator` command, the end-to-end tests and the benchmarks.
"""

from __future__ import annotations

import time
import uuid
from typing import Optional

import bittensor
import orjson
from bittensor.sp_core import Keypair


def signer_for(key: Optional[str] = None, wallet_name: Optional[str] = None, wallet_hotkey: str = "default",
               wallet_path: str = "~/.bittensor/wallets"):
    """A dev URI (//Alice) or a wallet on disk."""
    if wallet_name is not None:
        return bittensor.Wallet(name=wallet_name, hotkey=wallet_hotkey, path=wallet_path)
    return Keypair.create_from_uri(key or "//Alice")


def epistula_headers(signer, body: bytes, receiver_ss58: Optional[str]) -> dict[str, str]:
    """Epistula v2 headers for `body`, as validators send them (serve_app/router/epistula.py)."""
    from serve_app.router import epistula

    keypair = signer.hotkey if isinstance(signer, bittensor.Wallet) else signer
    request_id, timestamp = str(uuid.uuid4()), str(round(time.time() * 1000))
    headers = {epistula.HEADER_VERSION: epistula.VERSION, epistula.HEADER_TIMESTAMP: timestamp,
               epistula.HEADER_UUID: request_id, epistula.HEADER_SIGNED_BY: keypair.ss58_address}
    if receiver_ss58:
        headers[epistula.HEADER_SIGNED_FOR] = receiver_ss58
    signature = keypair.sign(epistula.message(body, request_id, timestamp, receiver_ss58 or ""))
    headers[epistula.HEADER_SIGNATURE] = "0x" + bytes(signature).hex()
    return headers


def signed_request(signer, path: str, payload: object, receiver_ss58: Optional[str],
                   scheme: str = "btauth") -> tuple[bytes, dict[str, str]]:
    """(body, headers) for a JSON POST to `path`, signed for `receiver_ss58` under `scheme`
    (btauth or epistula: the subnet's auth.scheme)."""
    body = orjson.dumps(payload)
    if scheme == "epistula":
        headers = epistula_headers(signer, body, receiver_ss58)
    else:
        headers = bittensor.http_auth.sign(signer, method="POST", path=path, body=body, receiver_ss58=receiver_ss58)
    headers["Content-Type"] = "application/json"
    return body, headers


def error_code(status: int, body: bytes) -> str:
    """The miner's JSON error code of a refusal; `non-json <status>` for anything else (HAProxy's
    own pages, a proxy in between)."""
    try:
        return str(orjson.loads(body).get("error", "?"))
    except Exception:
        return f"non-json {status}"
