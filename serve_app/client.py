"""A validator's side of the wire: sign a request with btauth/1 and send it.

Used by the `torchrank-miner validator` command, the end-to-end tests and the benchmarks.
"""

from __future__ import annotations

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


def signed_request(signer, path: str, payload: object, receiver_ss58: Optional[str]) -> tuple[bytes, dict[str, str]]:
    """(body, headers) for a JSON POST to `path`, signed for `receiver_ss58`."""
    body = orjson.dumps(payload)
    headers = bittensor.http_auth.sign(signer, method="POST", path=path, body=body, receiver_ss58=receiver_ss58)
    headers["Content-Type"] = "application/json"
    return body, headers
