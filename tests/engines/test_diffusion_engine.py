"""The diffusion engine on the tiny pipeline: presets, padded batches, seeded PNG bytes."""

import io
import time

import pytest
from PIL import Image

from serve_app.config import DiffusionConfig

from serve_app.contracts import DeadlinePassed, ImageJob, RenderSpec
from serve_app.engines.diffusion import DiffusionEngine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = DiffusionEngine(DiffusionConfig(runtime={"cache_dir": str(tmp_path_factory.mktemp("cache")), "device": "cpu"}))
    yield engine
    engine.close()  # the model's memory and threads go before the next module's tests


def spec(engine, preset, **change):
    return RenderSpec(**{**engine.preset_spec(preset).__dict__, **change})


def unet_calls(engine):
    calls = []
    handle = engine.pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def test_seeded_image_is_the_same_bytes_alone_or_batched(engine):
    alone = engine.generate([ImageJob("a red cat", 7)], spec(engine, "balanced"))[0]
    batched = engine.generate([ImageJob("a dog", 1), ImageJob("x", 2), ImageJob("a red cat", 7)], spec(engine, "balanced"))
    assert batched[2] == alone
    assert batched[0] != alone and batched[1] != batched[0]
    image = Image.open(io.BytesIO(alone))
    assert image.format == "PNG" and image.size == (64, 64)


def test_one_call_per_batch_with_the_specs_steps_and_size(engine):
    calls, handle = unet_calls(engine)
    try:
        before = engine.calls
        engine.generate([ImageJob(f"p{i}", i) for i in range(4)], spec(engine, "fast"))
        assert engine.calls == before + 1
        assert len(calls) == engine.cfg.model.presets["fast"].steps  # each step: one UNet pass for the whole batch
        calls.clear()
        wide = engine.generate([ImageJob("p", 1)], spec(engine, "fast", steps=3, width=128))[0]
        assert len(calls) == 3 and Image.open(io.BytesIO(wide)).size == (128, 64)
    finally:
        handle.remove()


def test_presets_with_their_own_scheduler_share_the_weights(engine):
    assert type(engine.pipes["quality"].scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert engine.pipes["quality"].unet is engine.pipe.unet
    quality = spec(engine, "quality")
    assert engine.generate([ImageJob("x", 3)], quality)[0] == engine.generate([ImageJob("x", 3)], quality)[0]


def test_batch_bounds(engine):
    with pytest.raises(ValueError):
        engine.generate([], spec(engine, "fast"))
    with pytest.raises(ValueError):
        engine.generate([ImageJob("x", i) for i in range(5)], spec(engine, "fast"))


def test_probe_is_one_real_step(engine):
    calls, handle = unet_calls(engine)
    try:
        engine.probe()
        assert len(calls) == 1
    finally:
        handle.remove()


def test_a_call_stops_at_the_next_step_once_every_deadline_has_passed(engine):
    long = spec(engine, "balanced", steps=200)  # ~2.6 s here when it runs every step (13 ms a step)
    calls, handle = unet_calls(engine)
    try:
        started = time.perf_counter()
        with pytest.raises(DeadlinePassed):
            engine.generate([ImageJob("a", 1, deadline=time.time() + 0.25), ImageJob("b", 2, deadline=time.time() + 0.2)],
                            long)
        seconds = time.perf_counter() - started
        assert 0 < len(calls) < long.steps // 2 and seconds < 1.3  # stopped after ~20 steps, not 200
        calls.clear()
        with pytest.raises(DeadlinePassed):  # late before it starts: no step at all
            engine.generate([ImageJob("a", 1, deadline=time.time() - 1)], long)
        assert calls == []
    finally:
        handle.remove()


def test_a_call_shared_with_work_still_in_time_runs_every_step(engine):
    fast = spec(engine, "fast", steps=6)
    alone = engine.generate([ImageJob("in time", 4)], fast)[0]
    calls, handle = unet_calls(engine)
    try:
        images = engine.generate([ImageJob("late", 3, deadline=time.time() - 1),
                                  ImageJob("in time", 4, deadline=time.time() + 60)], fast)
        assert len(calls) == fast.steps and images[1] == alone  # the late image comes too: its caller drops it
    finally:
        handle.remove()
