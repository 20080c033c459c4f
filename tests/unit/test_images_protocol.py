import pytest

from serve_app.config import DiffusionConfig, SubnetDiffusion

from serve_app.contracts import RenderSpec
from serve_app.errors import ApiError
from serve_app.protocols.images import MAX_SEED, OpenAIImages

CFG = DiffusionConfig(limits={"max_steps": 16, "max_side": 128})
ADAPTER = OpenAIImages(CFG)


def refused(body: bytes, adapter=ADAPTER):
    with pytest.raises(ApiError) as err:
        adapter.parse(body)
    return err.value.status, err.value.code, err.value.detail


def test_defaults_come_from_the_preset_and_a_seed_is_drawn():
    req = ADAPTER.parse(b'{"prompt": "a cat", "n": 2}')
    assert (req.preset, req.steps, req.size) == ("balanced", 4, "64x64") and 0 <= req.seed < MAX_SEED
    assert ADAPTER.seeds(req) == [req.seed, req.seed + 1]
    assert ADAPTER.spec(req) == RenderSpec("balanced", 4, 64, 64)


def test_steps_and_size_within_limits_override_the_preset():
    req = ADAPTER.parse(b'{"prompt": "a cat", "seed": 5, "preset": "fast", "size": "128x64", "steps": 16}')
    assert req.seed == 5 and ADAPTER.spec(req) == RenderSpec("fast", 16, 128, 64)


def test_a_subnet_picks_its_default_and_allowed_presets():
    adapter = OpenAIImages(CFG, SubnetDiffusion(default_preset="fast", allowed_presets=("fast", "balanced")))
    assert adapter.parse(b'{"prompt": "x"}').preset == "fast"
    assert adapter.parse(b'{"prompt": "x", "preset": "balanced"}').preset == "balanced"
    status, code, detail = refused(b'{"prompt": "x", "preset": "quality"}', adapter)
    assert (status, code) == (422, "limit_exceeded") and "'quality' is not offered" in detail


@pytest.mark.parametrize("body, field", [
    (b'{"prompt": "x", "preset": "ultra"}', "preset"),
    (b'{"prompt": "x", "size": "512x512"}', "size"),
    (b'{"prompt": "x", "size": "32x64"}', "size"),
    (b'{"prompt": "x", "size": "68x64"}', "size"),
    (b'{"prompt": "x", "steps": 17}', "steps"),
    (b'{"prompt": "x", "n": 5}', "n"),
    (b'{"prompt": "' + b"p" * 1001 + b'"}', "prompt"),
    (b'{"prompt": "x", "negative_prompt": "' + b"p" * 1001 + b'"}', "negative_prompt"),
    (b'{"prompt": "   "}', "prompt"),
    (b'{"prompt": "x", "n": 2, "seed": 9223372036854775807}', "seed"),
])
def test_limits_are_422_naming_the_field(body, field):
    status, code, detail = refused(body)
    assert (status, code) == (422, "limit_exceeded") and detail.startswith(field)


@pytest.mark.parametrize("body", [b'{"prompt": 1}', b'{"prompt": "x", "n": 0}', b'{"prompt": "x", "seed": -1}',
                                  b'{"prompt": "x", "response_format": "url"}', b'{"prompt": "x", "extra": 1}',
                                  b'{"prompt": "x", "size": "big"}', b'{"prompt": "x", "steps": 0}',
                                  b'{"prompt": "x", "seed": 9223372036854775808}'])
def test_schema_errors_are_422(body):
    assert refused(body)[:2] == (422, "invalid_request")


def test_a_subnet_bounds_steps_and_size_below_the_workload():
    adapter = OpenAIImages(CFG, SubnetDiffusion(max_steps=6, max_side=64))
    assert adapter.spec(adapter.parse(b'{"prompt": "x", "steps": 6, "size": "64x64"}')) == RenderSpec("balanced", 6, 64, 64)
    assert refused(b'{"prompt": "x", "steps": 7}', adapter) == (422, "limit_exceeded", "steps: 7, at most 6")
    assert refused(b'{"prompt": "x", "size": "128x64"}', adapter) == (
        422, "limit_exceeded", "size: 128x64: each side a multiple of 8 from 64 to 64")
    # A preset the subnet offers, whose steps pass its limit: refused all the same, naming steps.
    assert refused(b'{"prompt": "x", "preset": "quality"}', adapter) == (422, "limit_exceeded", "steps: 8, at most 6")


def test_cost_is_images_times_pixel_steps_over_the_default_presets():
    # The default preset, balanced, is 4 steps at 64x64: one such image costs 1.
    def cost(body: bytes) -> float:
        return ADAPTER.cost(ADAPTER.parse(body))

    assert cost(b'{"prompt": "x"}') == 1.0
    assert cost(b'{"prompt": "x", "n": 3}') == 3.0
    assert cost(b'{"prompt": "x", "preset": "fast"}') == 0.5
    assert cost(b'{"prompt": "x", "steps": 16, "size": "128x128", "n": 2}') == 2 * 4 * 4
    # Against the workload's default, not the subnet's: one admission queue serves every subnet.
    subnet = OpenAIImages(CFG, SubnetDiffusion(default_preset="fast"))
    assert subnet.cost(subnet.parse(b'{"prompt": "x"}')) == 0.5
