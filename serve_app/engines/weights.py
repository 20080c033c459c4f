"""Model identity for /info: a digest of the weight files validators can compare."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, Optional


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


def build_once(path: Path, marker: str, write: Callable[[Path], None]) -> Path:
    """`write(directory)` a locally built model into `path` unless `path/marker` exists.

    Replicas starting together may build at once: each writes its own staging directory,
    and only a complete build is ever renamed into place. The builds are the same (fixed
    seeds), so whichever lands first is kept.
    """
    path = Path(path)
    if (path / marker).exists():
        return path
    staging = path.with_name(f"{path.name}.partial-{os.getpid()}")
    write(staging)
    try:
        staging.rename(path)
    except OSError:  # another process finished first
        if not (path / marker).exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return path
