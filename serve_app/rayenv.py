"""The Ray Serve environment the miner runs under, from `deployments/ray.env`.

Ray reads these variables once, in every Ray process, so they must be in the
environment before Ray starts: the Makefile exports them for `serve run`, and the
tests and benchmarks call `apply()` before `ray.init`. A variable already set wins.
"""

from __future__ import annotations

import os
from pathlib import Path

RAY_ENV_FILE = Path(__file__).resolve().parent.parent / "deployments" / "ray.env"


def read(path: Path = RAY_ENV_FILE) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def apply(path: Path = RAY_ENV_FILE, **overrides: str) -> dict[str, str]:
    """Set the file's variables (and `overrides`) where the environment has none; return what applies."""
    for key, value in {**read(path), **overrides}.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in {**read(path), **overrides}}
