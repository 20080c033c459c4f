"""The Prometheus config and rules pass promtool, and the alerts fire (and stay quiet)
as their unit tests in monitoring/tests say."""

import shutil
import subprocess
from pathlib import Path

import pytest

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make test` installs Debian's prometheus package"
    return path


def run(*args):
    return subprocess.run(args, capture_output=True, text=True, cwd=MONITORING, timeout=120)


def test_rules_are_valid(promtool):
    out = run(promtool, "check", "rules", "rules/torchrank.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_config_is_valid(promtool):
    out = run(promtool, "check", "config", "--syntax-only", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_unit_tests_pass(promtool):
    tests = sorted(str(p.relative_to(MONITORING)) for p in (MONITORING / "tests").glob("*.yml"))
    assert tests
    out = run(promtool, "test", "rules", *tests)
    assert out.returncode == 0, out.stdout + out.stderr
