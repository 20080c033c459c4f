"""A tiny Stable-Diffusion-shaped pipeline built from configs, for machines with no model hub.

Fixed random weights (seeded), a char-level CLIP tokenizer written from scratch, a 2-block
UNet, a small VAE (8x down-sampling: 64 px images from 8x8 latents) and DDIM. It is
saved with `save_pretrained` and loaded back through `from_pretrained`, the same path a
real hub model takes, so the serving code cannot tell the difference. The images are
noise-like, but deterministic: enough for tests, the embedded default and benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

from serve_app.engines.weights import build_once

TINY_DIFFUSION_ID = "torchrank/tiny-sd"  # the name the embedded default uses
SEED = 1234


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values (the BPE vocabulary's alphabet)."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in visible:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer(path: Path) -> int:
    """A CLIP tokenizer with one token per byte (no merges); returns the vocabulary size."""
    path.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return len(tokens)


def build_tiny_pipeline(path: str | Path) -> Path:
    """Build and save the pipeline under `path` (idempotent: an existing build is kept)."""
    return build_once(Path(path), "model_index.json", _write)


def _write(staging: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(SEED)
    vocab = write_tokenizer(staging / "tokenizer_src")
    tokenizer = CLIPTokenizer(str(staging / "tokenizer_src/vocab.json"), str(staging / "tokenizer_src/merges.txt"),
                              model_max_length=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4, sample_size=64)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(staging))
