"""What the miner publishes about itself on `GET /info`: version, git sha, uptime,
subnets, models and the latest CHANGELOG entries ("uptime, version, changes" from the
miner guide). Collected by the builder, where the repository is, and handed to the
Router; nothing here is secret.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serve_app import __version__

REPO = Path(__file__).resolve().parent.parent.parent
CHANGELOG = REPO / "CHANGELOG.md"


def git_sha(repo: Path = REPO) -> str:
    """The commit the miner runs, with "-dirty" for local changes; "unknown" outside git."""
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def changelog_entries(path: Path = CHANGELOG, latest: int = 3) -> list[dict]:
    """The newest `latest` sections of a keep-a-changelog style file: [{version, changes}]."""
    try:
        text = path.read_text()
    except OSError:
        return []
    entries = []
    for block in re.split(r"^## ", text, flags=re.M)[1:]:
        heading, _, body = block.partition("\n")
        changes = [line[2:].strip() for line in body.splitlines() if line.startswith("- ")]
        entries.append({"version": heading.strip(), "changes": changes})
    return entries[:latest]


@dataclass(frozen=True)
class BuildInfo:
    version: str = __version__
    git_sha: str = field(default_factory=git_sha)
    started_at: float = field(default_factory=time.time)
    changes: tuple = field(default_factory=lambda: tuple(changelog_entries()))

    def as_dict(self) -> dict:
        out = asdict(self)
        out["changes"] = list(self.changes)
        out["uptime_s"] = round(time.time() - self.started_at, 1)
        return out
