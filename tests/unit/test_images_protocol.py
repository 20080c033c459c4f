import pytest

from serve_app.config import DiffusionConfig
from serve_app.errors import ApiError
from serve_app.protocols.images import MAX_SEED, OpenAIImages

ADAPTER = OpenAIImages(DiffusionConfig())


def refused(body: bytes):
    with pytest.raises(ApiError) as err:
        ADAPTER.parse(body)
    return err.value.status, err.value.code, err.value.detail


def test_defaults_fill_preset_and_seed():
    req = ADAPTER.parse(b'{"prompt": "a cat", "n": 2}')
    assert req.preset == "balanced" and 0 <= req.seed < MAX_SEED
    assert ADAPTER.seeds(req) == [req.seed, req.seed + 1]
    assert ADAPTER.parse(b'{"prompt": "a cat", "seed": 5, "preset": "fast", "size": "64x64"}').seed == 5


@pytest.mark.parametrize("body, field", [
    (b'{"prompt": "x", "preset": "ultra"}', "preset"),
    (b'{"prompt": "x", "size": "512x512"}', "size"),
    (b'{"prompt": "x", "n": 5}', "n"),
    (b'{"prompt": "' + b"p" * 1001 + b'"}', "prompt"),
    (b'{"prompt": "   "}', "prompt"),
    (b'{"prompt": "x", "n": 2, "seed": 9223372036854775807}', "seed"),
])
def test_limits_are_422_naming_the_field(body, field):
    status, code, detail = refused(body)
    assert (status, code) == (422, "limit_exceeded") and detail.startswith(field)


@pytest.mark.parametrize("body", [b'{"prompt": 1}', b'{"prompt": "x", "n": 0}', b'{"prompt": "x", "seed": -1}',
                                  b'{"prompt": "x", "response_format": "url"}', b'{"prompt": "x", "extra": 1}',
                                  b'{"prompt": "x", "size": "big"}'])
def test_schema_errors_are_422(body):
    assert refused(body)[:2] == (422, "invalid_request")
