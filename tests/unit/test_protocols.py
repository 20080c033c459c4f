import asyncio
import base64
import time

import numpy as np
import pytest

from serve_app.config import EmbeddingsConfig
from serve_app.errors import ApiError
from serve_app.protocols.embeddings import OpenAIEmbeddings

ADAPTER = OpenAIEmbeddings(EmbeddingsConfig(limits={"max_texts_per_request": 3, "max_chars_per_text": 10}, batching={"max_batch_texts": 8}))


def refusal(body: bytes):
    with pytest.raises(ApiError) as err:
        ADAPTER.parse(body)
    return err.value.status, err.value.code, err.value.detail


@pytest.mark.parametrize(
    "body, code, names",
    [
        (b"{not json", "invalid_json", "not valid JSON"),
        (b"", "invalid_json", "not valid JSON"),
        (b"[1, 2]", "invalid_request", "expected a JSON object"),
        (b"{}", "invalid_request", "input"),
        (b'{"input": 5}', "invalid_request", "input"),
        (b'{"input": ["a", 3]}', "invalid_request", "input"),
        (b'{"input": "a", "dimensions": 8}', "invalid_request", "dimensions"),
        (b'{"input": "a", "encoding_format": "int8"}', "invalid_request", "encoding_format"),
        (b'{"input": []}', "limit_exceeded", "input: at least one"),
        (b'{"input": ["a", "b", "c", "d"]}', "limit_exceeded", "input: 4 texts, at most 3"),
        (b'{"input": ["a", "0123456789x"]}', "limit_exceeded", "input[1]: 11 characters"),
        (b'{"input": "0123456789x"}', "limit_exceeded", "input: 11 characters"),
        (b'{"input": "a", "model": "gpt-4"}', "limit_exceeded", "model"),
    ],
)
def test_bad_input_is_a_422_naming_the_problem(body, code, names):
    status, got_code, detail = refusal(body)
    assert (status, got_code) == (422, code)
    assert names in detail


def test_errors_do_not_echo_the_input():
    _, _, detail = refusal(b'{"input": {"secret-looking-value": 1}}')
    assert "secret-looking-value" not in detail


def test_accepts_string_list_and_known_model_names():
    assert ADAPTER.parse(b'{"input": "hi"}').texts == ["hi"]
    assert ADAPTER.parse(b'{"input": ["a", "b"], "model": "all-MiniLM-L6-v2"}').texts == ["a", "b"]
    assert ADAPTER.parse(b'{"input": "a", "model": "sentence-transformers/all-MiniLM-L6-v2"}').texts == ["a"]


class _Handle:
    """The workload handle is isolated here: the adapter's response shape is under test."""

    deployment_name = "Embeddings"

    class embed_many:
        @staticmethod
        async def remote(requests):
            results = []
            for texts, deadline, degradable in requests:
                assert deadline > 0 and degradable is False
                results.append((np.arange(len(texts) * 3, dtype=np.float32).reshape(len(texts), 3), 7))
            return results


def test_response_shape_and_base64():
    req = ADAPTER.parse(b'{"input": ["a", "b"], "encoding_format": "base64"}')
    out = asyncio.run(ADAPTER.run(req, _Handle, time.time() + 5, False))
    assert out["object"] == "list" and out["model"] == "all-MiniLM-L6-v2"
    assert out["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [d["index"] for d in out["data"]] == [0, 1]
    second = np.frombuffer(base64.b64decode(out["data"][1]["embedding"]), dtype="<f4")
    assert second.tolist() == [3.0, 4.0, 5.0]
