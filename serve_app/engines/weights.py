"""Model identity for /info: a digest of the weight files validators can compare."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional


def weights_digest(path: str) -> Optional[str]:
    """sha256 of the model's weight files, in path order, subfolders included (a diffusers
    pipeline keeps them per component): the first 16 hex digits. None for a hub id
    resolved by the library's own cache."""
    root = Path(path)
    files = sorted(p for pattern in ("*.safetensors", "*.bin") for p in root.rglob(pattern)) if root.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
