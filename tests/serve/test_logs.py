"""Request logs: one JSON line per request with who, where and how it ended; never a
body, signature or key."""

import json
import time
import uuid
from pathlib import Path

from bittensor.sp_core import Keypair

from serve_app.client import signed_request
from tests.conftest import MINER, ss58


def session_logs() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"


def router_lines() -> list[dict]:
    lines = []
    for path in (session_logs() / "serve").glob("replica_*_Router_*.log"):
        for line in path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
    return lines


def wait_for_line(request_id: str, timeout_s: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in router_lines():
            if line.get("request_id") == request_id and line.get("message") == "request":
                return line
        time.sleep(0.5)
    raise AssertionError(f"no request line for {request_id}")


def test_each_request_logs_one_json_line(miner):
    ok = miner.post({"input": "log me"})
    line = wait_for_line(ok.headers["x-request-id"])
    assert line["netuid"] == "1" and line["path"] == "/v1/embeddings"
    assert line["caller"] == ss58("//Alice") and line["caller_class"] == "validator"
    assert line["status"] == 200 and line["outcome"] == "ok" and line["admitted"] is True
    assert line["ms"] > 0

    # A refusal the router makes (HAProxy's own, such as a hotkey without a permit, are counted apart):
    # //Alice's headers over another body.
    body, headers = signed_request(Keypair.create_from_uri("//Alice"), "/v1/embeddings", {"input": "x"}, MINER)
    refused = miner.http.post("/v1/embeddings", content=body.replace(b'"x"', b'"y"'), headers=headers)
    line = wait_for_line(refused.headers["x-request-id"])
    assert line["status"] == 401 and line["outcome"] == "bad_signature"
    assert line["caller_class"] == "unauthenticated" and line["admitted"] is False


def test_logs_never_hold_bodies_signatures_or_keys(miner):
    marker = f"secret-body-{uuid.uuid4().hex}"
    body, headers = signed_request(Keypair.create_from_uri("//Alice"), "/v1/embeddings", {"input": marker}, MINER)
    resp = miner.http.post("/v1/embeddings", content=body, headers=headers)
    assert resp.status_code == 200
    bad = dict(headers, **{"X-Bittensor-Signature": "0x" + "ab" * 64})
    assert miner.http.post("/v1/embeddings", content=body, headers=bad).status_code == 401
    wait_for_line(resp.headers["x-request-id"])
    time.sleep(1.5)  # the flush period
    forbidden = [marker, headers["X-Bittensor-Signature"], bad["X-Bittensor-Signature"], "//Alice", "//Bob"]
    for path in session_logs().rglob("*"):
        if path.is_file() and path.suffix in (".log", ".out", ".err"):
            text = path.read_text(errors="replace")
            for secret in forbidden:
                assert secret not in text, f"{secret[:20]}... found in {path.name}"
