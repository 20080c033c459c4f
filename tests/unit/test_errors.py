"""The one response encoder: what orjson cannot encode must not turn an answer into a 500."""

import json

import numpy as np

from serve_app.errors import error_response, json_response


def test_integers_beyond_64_bits_are_encoded_as_their_decimal_text():
    resp = json_response({"result": 2**70, "steps": [{"value": -(10**20)}], "huge": 10**5000, "ok": 2**63 - 1})
    body = json.loads(resp.body)
    assert body == {"result": str(2**70), "steps": [{"value": str(-(10**20))}], "huge": "an integer of 16610 bits",
                    "ok": 2**63 - 1}


def test_numpy_arrays_still_take_the_fast_path():
    resp = json_response({"embedding": np.array([0.5, 0.25], dtype=np.float32)})
    assert json.loads(resp.body) == {"embedding": [0.5, 0.25]}


# The catalogue: one place per error code, read by everything that names one.

import re
from pathlib import Path

import pytest

from serve_app.errors import MINER_FAILURES, REFUSALS, ApiError, ErrorCode

REPO = Path(__file__).resolve().parents[2]


def test_a_code_is_its_name_and_carries_its_status():
    err = ApiError(ErrorCode.shed, "busy")
    assert (err.code, err.status, str(err.code)) == ("shed", 503, "shed")
    assert json.loads(error_response(err).body) == {"error": "shed", "detail": "busy"}


def test_load_refusals_and_miner_failures_come_from_the_catalogue():
    assert REFUSALS == {"rate_limited", "shed", "breaker_open"}
    assert MINER_FAILURES == {"unavailable", "deadline_exceeded", "internal_error", "shed", "breaker_open"}
    assert all(ErrorCode(code).status >= 500 for code in MINER_FAILURES)


def test_no_code_is_written_as_a_free_string_in_the_runtime():
    for path in (REPO / "serve_app").rglob("*.py"):
        assert not re.search(r"ApiError\(\s*\d", path.read_text()), f"{path}: ApiError takes an ErrorCode"


@pytest.mark.parametrize("page", sorted((REPO / "deployments" / "haproxy").glob("*.http")), ids=lambda p: p.name)
def test_haproxys_own_pages_use_catalogue_codes(page):
    head, _, body = page.read_bytes().decode().partition("\r\n\r\n")
    status = int(head.split()[1])
    code = ErrorCode(json.loads(body)["error"])
    # HAProxy's 502 (the router went away mid-request) is the miner's `unavailable`.
    assert code.status == status or (status, code) == (502, ErrorCode.unavailable)


def test_the_readme_table_lists_every_code_as_the_catalogue_does():
    text = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \| (miner|caller) \| (yes|no) \|", text, flags=re.M)
    assert rows == [(c.value, str(c.status), "miner" if c.miner_failure else "caller", "yes" if c.refusal else "no")
                    for c in ErrorCode]
