"""The tiny diffusion pipeline: built from configs, loaded back through from_pretrained."""

import json

import numpy as np
import pytest
import torch

from serve_app.engines.tiny_diffusion import build_tiny_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffusers import AutoPipelineForText2Image

    path = build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd")
    return AutoPipelineForText2Image.from_pretrained(str(path))


def generate(pipe, prompts, seeds, steps=3):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, num_inference_steps=steps, height=64, width=64, generator=generators,
                output_type="np").images


def test_build_is_a_real_pipeline_directory_and_idempotent(tmp_path):
    path = build_tiny_pipeline(tmp_path / "sd")
    index = json.loads((path / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    stamp = (path / "model_index.json").stat().st_mtime_ns
    assert build_tiny_pipeline(path) == path and (path / "model_index.json").stat().st_mtime_ns == stamp
    assert not (tmp_path / "sd.partial").exists()


def test_loads_through_auto_pipeline_and_is_seeded(pipe):
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    a, b = generate(pipe, ["a cat"], [1]), generate(pipe, ["a cat"], [1])
    assert a.shape == (1, 64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, generate(pipe, ["a cat"], [2]))
    assert not np.array_equal(a, generate(pipe, ["a dog"], [1]))
