"""The one response encoder: what orjson cannot encode must not turn an answer into a 500."""

import json

import numpy as np

from serve_app.errors import json_response


def test_integers_beyond_64_bits_are_encoded_as_their_decimal_text():
    resp = json_response({"result": 2**70, "steps": [{"value": -(10**20)}], "huge": 10**5000, "ok": 2**63 - 1})
    body = json.loads(resp.body)
    assert body == {"result": str(2**70), "steps": [{"value": str(-(10**20))}], "huge": "an integer of 16610 bits",
                    "ok": 2**63 - 1}


def test_numpy_arrays_still_take_the_fast_path():
    resp = json_response({"embedding": np.array([0.5, 0.25], dtype=np.float32)})
    assert json.loads(resp.body) == {"embedding": [0.5, 0.25]}
