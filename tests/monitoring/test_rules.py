"""The Prometheus config and rules pass promtool, the alerts fire (and stay quiet) and the
economics rules compute what their unit tests in monitoring/tests say."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
RULE_FILES = sorted(str(p.relative_to(MONITORING)) for p in (MONITORING / "rules").glob("*.yml"))


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make test` installs Debian's prometheus package"
    return path


def run(*args):
    return subprocess.run(args, capture_output=True, text=True, cwd=MONITORING, timeout=120)


@pytest.mark.parametrize("rules", RULE_FILES)
def test_rules_are_valid(promtool, rules):
    out = run(promtool, "check", "rules", rules)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_config_is_valid(promtool):
    out = run(promtool, "check", "config", "--syntax-only", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(yaml.safe_load((MONITORING / "prometheus.yml").read_text())["rule_files"]) == RULE_FILES


def test_alert_unit_tests_pass(promtool):
    tests = sorted(str(p.relative_to(MONITORING)) for p in (MONITORING / "tests").glob("*.yml"))
    assert tests
    out = run(promtool, "test", "rules", *tests)
    assert out.returncode == 0, out.stdout + out.stderr
