"""The Ray Serve environment the miner runs under, from `deployments/ray.env`.

Ray reads these variables once, in every Ray process, so they must be in the
environment before Ray starts: `make run` starts `serve run` through
`python -m serve_app.rayenv serve run ...`, and the tests and benchmarks call `apply()`
before `ray.init`. A variable already set wins.

Only the Ray cluster's processes should see them: in a driver that already imported
`ray.serve` they change nothing, but a driver started with them (the throughput
profile) gets handles that only work inside an asyncio loop.
"""

from __future__ import annotations

import os
import sys
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


def apply(path: Path = RAY_ENV_FILE, **overrides: str) -> None:
    """Set the file's variables (and `overrides`) where the environment has none."""
    for key, value in {**read(path), **overrides}.items():
        os.environ.setdefault(key, value)


def main(argv: list[str]) -> None:
    """`python -m serve_app.rayenv CMD ARGS...`: run CMD under the miner's Ray environment."""
    if not argv:
        sys.exit("usage: python -m serve_app.rayenv COMMAND [ARGS...]")
    apply()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
