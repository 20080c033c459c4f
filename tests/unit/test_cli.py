"""The errors a user meets at the start: each one clear line on stderr and a non-zero exit,
never a traceback (issue 16 item 7). No miner and no Ray: closed ports and tiny local servers."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from serve_app import cli

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "deployments" / "local.yaml"
CLI = str(Path(sys.executable).with_name("torchrank-miner"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def one_line(err: str) -> str:
    """The one error line on stderr (warnings, e.g. a deprecated config field's, may come before it)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("torchrank-miner: ")]
    assert len(lines) == 1, err
    assert err.rstrip().endswith(lines[0]), err
    return lines[0]


def misspelt(tmp_path: Path, old: str = "require_receiver:", new: str = "require_reciever:") -> Path:
    text = LOCAL.read_text()
    assert old in text
    bad = tmp_path / "bad.yaml"
    # Absolute snapshot path: the file checks from anywhere but for the misspelling.
    bad.write_text(text.replace(old, new).replace("path: deployments/", f"path: {REPO}/deployments/"))
    return bad


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working directory outside the repository."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


class Answer(http.server.BaseHTTPRequestHandler):
    status, body, content_type = 200, b"{}", "application/json"

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def answering():
    """A local HTTP server answering every POST with (status, body, content type)."""
    servers = []

    def start(status: int, body: bytes, content_type: str = "application/json") -> str:
        handler = type("Handler", (Answer,), {"status": status, "body": body, "content_type": content_type})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# --- the default config from another directory ------------------------------------------------

def test_the_shipped_default_config_is_found_from_another_directory(elsewhere):
    # The real entry point, from a directory without deployments/: it reads the miner hotkey from
    # the shipped deployments/local.yaml and only then fails, on the closed port.
    run = subprocess.run([CLI, "validator", "embed", "x", "--url", f"http://127.0.0.1:{closed_port()}"],
                         cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    line = one_line(run.stderr)
    assert "cannot reach the miner" in line and "refused" in line


def test_a_config_in_the_current_directory_wins_over_the_shipped_one(elsewhere, tmp_path, capsys):
    (elsewhere / "deployments").mkdir()
    misspelt(elsewhere / "deployments", "uri: \"//Bob\"", "uri: \"//Charlie\"").rename(elsewhere / "deployments" / "local.yaml")
    assert cli.main(["config", "check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("deployments/local.yaml: ok")
    assert "5FLSigC9HGRKVhB9FiEo4Y3koPsNmBmLJbpXg2mp1hXcS59Y" in out  # //Charlie's, not //Bob's


def test_config_check_of_the_shipped_default_from_another_directory(elsewhere, capsys):
    # Its snapshot path is relative to the repository, where the file was found.
    assert cli.main(["config", "check"]) == 0
    assert capsys.readouterr().out.startswith(f"{LOCAL}: ok")


def test_a_missing_config_names_the_paths_tried(elsewhere, capsys):
    assert cli.main(["validator", "embed", "x", "--config", "deployments/nope.yaml",
                     "--url", f"http://127.0.0.1:{closed_port()}"]) == 2
    line = one_line(capsys.readouterr().err)
    assert str(elsewhere / "deployments" / "nope.yaml") in line and str(REPO / "deployments" / "nope.yaml") in line


def test_a_missing_absolute_config(tmp_path, capsys):
    assert cli.main(["config", "check", str(tmp_path / "nope.yaml")]) == 2
    assert str(tmp_path / "nope.yaml") in one_line(capsys.readouterr().err)


# --- the miner: not running, slow, answering errors -----------------------------------------

def test_no_miner_running(capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    assert cli.main(["validator", "embed", "x", "--url", url]) == 2
    line = one_line(capsys.readouterr().err)
    assert url in line and "refused" in line


def test_simulate_with_no_miner_running(capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    assert cli.main(["simulate", "--url", url, "--no-reference"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"cannot reach the miner at {url}" in line and "make run" in line


@pytest.mark.parametrize("flag, value", [("--rate", "inf"), ("--rate", "0"), ("--seconds", "nan"),
                                         ("--seconds", "-5"), ("--target", "1.5")])
def test_simulate_refuses_rates_lengths_and_targets_out_of_range(flag, value, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["simulate", flag, value])
    assert exited.value.code == 2 and f"{value!r}" in capsys.readouterr().err


def test_simulate_refuses_a_run_too_large_to_keep(capsys):
    assert cli.main(["simulate", "--rate", "10000", "--seconds", "86400"]) == 2
    assert "at most 2,000,000 a run" in one_line(capsys.readouterr().err)


def test_simulate_names_a_bad_validators_file(tmp_path, capsys):
    with socket.socket() as listener:  # something listening: /health gets past the connect
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        bad = tmp_path / "v.yaml"
        bad.write_text("validators: []\n")
        assert cli.main(["simulate", "--url", url, "--no-reference", "--validators", str(bad)]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"validators file {bad}" in line and "at least 1 item" in line


def test_a_miner_that_does_not_answer_in_time(capsys):
    with socket.socket() as listener:  # accepts connections (the backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        assert cli.main(["validator", "embed", "x", "--url", url, "--timeout", "0.3"]) == 2
    line = one_line(capsys.readouterr().err)
    assert url in line and "0.3 s" in line


def test_an_http_error_prints_the_miners_code_and_detail(answering, capsys):
    url = answering(403, json.dumps({"error": "not_registered", "detail": "hotkey 5X is not registered"}).encode())
    assert cli.main(["validator", "embed", "x", "--url", url]) == 1
    assert one_line(capsys.readouterr().err) == "torchrank-miner: HTTP 403 not_registered: hotkey 5X is not registered"


def test_an_http_error_that_is_not_json(answering, capsys):
    # HAProxy's own 500 page is plain text.
    url = answering(500, b"<html><body><h1>500 Internal Server Error</h1>\nAn internal server error occurred.\n</body></html>\n",
                    "text/html")
    for command in (["validator", "embed", "x"], ["validator", "image", "x"], ["validator", "agent", "x"]):
        assert cli.main([*command, "--url", url]) == 1
        line = one_line(capsys.readouterr().err)
        assert line.startswith("torchrank-miner: HTTP 500") and "500 Internal Server Error" in line


def test_a_success_that_is_not_what_the_command_expects(answering, capsys):
    url = answering(200, b"not json", "text/plain")
    assert cli.main(["validator", "embed", "x", "--url", url]) == 1
    assert "not JSON" in one_line(capsys.readouterr().err)
    url = answering(200, b'{"object": "list"}')
    assert cli.main(["validator", "embed", "x", "--url", url]) == 1
    assert "data" in one_line(capsys.readouterr().err)


# --- invalid configs ------------------------------------------------------------------------

def test_a_config_that_is_not_yaml(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("applications: [\n  - name: x\n")
    for command in (["config", "check", str(broken)],
                    ["validator", "embed", "x", "--config", str(broken), "--url", f"http://127.0.0.1:{closed_port()}"]):
        assert cli.main(command) != 0
        line = one_line(capsys.readouterr().err)
        assert str(broken) in line and "YAML" in line


def test_a_config_without_the_miner_application(tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text("- just\n- a list\n")
    assert cli.main(["config", "check", str(other)]) == 1
    assert "no application with import_path serve_app.app:build_app" in one_line(capsys.readouterr().err)


def test_an_unreadable_config(tmp_path, capsys):
    assert cli.main(["config", "check", str(tmp_path)]) == 2  # a directory
    assert str(tmp_path) in one_line(capsys.readouterr().err)


def test_config_check_of_a_misspelt_auth_field_prints_one_error_with_its_path(tmp_path, capsys):
    bad = misspelt(tmp_path)
    assert cli.main(["config", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "Tuple should have" not in err
    assert one_line(err) == f"torchrank-miner: {bad}: subnets[0].auth.require_reciever: Extra inputs are not permitted"


def test_config_check_lists_each_real_problem_once(tmp_path, capsys):
    bad = misspelt(tmp_path)
    bad.write_text(bad.read_text().replace("max_body_bytes:", "max_body_byts:"))
    assert cli.main(["config", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Tuple should have" not in err
    assert [line for line in err.splitlines() if line.startswith("torchrank-miner: ")] == [
        f"torchrank-miner: {bad}: subnets[0].auth.require_reciever: Extra inputs are not permitted",
        f"torchrank-miner: {bad}: router.max_body_byts: Extra inputs are not permitted"]


def test_a_misspelt_field_in_the_validator_commands_config(tmp_path, capsys):
    bad = misspelt(tmp_path, "uri: \"//Bob\"", "url: \"//Bob\"")
    assert cli.main(["validator", "embed", "x", "--config", str(bad), "--url", f"http://127.0.0.1:{closed_port()}"]) == 1
    err = capsys.readouterr().err
    assert "wallet.url: Extra inputs are not permitted" in err and "Traceback" not in err


def test_a_consistency_error_has_no_path_prefix_but_its_message(tmp_path, capsys):
    bad = misspelt(tmp_path, "netuid: 1", "netuid: 1")
    text = bad.read_text()
    start = text.index("        - netuid: 1")
    end = re.compile(r"^      \w", re.M).search(text, start).start()  # the next section after subnets:
    bad.write_text(text[:end] + text[start:end] + text[end:])  # the same subnet twice
    assert cli.main(["config", "check", str(bad)]) == 1
    assert one_line(capsys.readouterr().err) == f"torchrank-miner: {bad}: subnets: duplicate netuid in [1, 1]"


# --- make run: rayenv checks the serve config before exec'ing serve run -----------------------

def rayenv(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run([sys.executable, "-m", "serve_app.rayenv", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_rayenv_refuses_a_serve_config_with_a_misspelt_field_before_running_the_command(tmp_path):
    bad = misspelt(tmp_path)
    marker = tmp_path / "ran"
    run = rayenv("sh", "-c", f"touch {marker}", "run", str(bad), cwd=REPO)
    assert run.returncode == 2, run.stderr
    assert "subnets[0].auth.require_reciever: Extra inputs are not permitted" in run.stderr
    assert "Tuple should have" not in run.stderr and "Traceback" not in run.stderr
    assert not marker.exists()


def test_rayenv_resolves_the_config_as_serve_run_would(tmp_path):
    # A relative snapshot path is relative to the directory serve run starts in: the shipped
    # config starts from the repository root, not from elsewhere.
    marker = tmp_path / "ran"
    assert rayenv("sh", "-c", f"touch {marker}", "run", "deployments/local.yaml", cwd=REPO).returncode == 0
    assert marker.exists()
    marker.unlink()
    run = rayenv("sh", "-c", f"touch {marker}", "run", str(LOCAL), cwd=tmp_path)
    assert run.returncode == 2 and "metagraph.path" in run.stderr and not marker.exists()


def test_rayenv_refuses_a_missing_serve_config(tmp_path):
    run = rayenv("sh", "-c", "exit 0", "run", "deployments/nope.yaml", cwd=REPO)
    assert run.returncode == 2 and "deployments/nope.yaml" in run.stderr


def test_rayenv_leaves_other_yaml_alone(tmp_path):
    # `ray start --autoscaling-config=...yaml` (cluster.yaml) and YAML that is not a serve config.
    other = tmp_path / "autoscaler.yaml"
    other.write_text("cluster_name: x\n")
    marker = tmp_path / "ran"
    run = rayenv("sh", "-c", f"touch {marker}", f"--autoscaling-config={tmp_path}/absent.yaml", str(other), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert marker.exists()


# --- the validator commands sign under the subnet's scheme ----------------------------------------

class Recording(Answer):
    seen: list = []
    body = json.dumps({"object": "list", "data": [{"index": 0, "embedding": [0.1] * 8}], "model": "m",
                       "usage": {"prompt_tokens": 1}}).encode()

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append((dict(self.headers), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


def test_validator_commands_sign_with_the_scheme_of_the_subnet_serving_the_path(tmp_path, capsys):
    from serve_app.router import epistula

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recording)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    config = tmp_path / "epistula.yaml"
    config.write_text(LOCAL.read_text().replace("scheme: btauth", "scheme: epistula")
                      .replace("path: deployments/", f"path: {REPO}/deployments/"))
    miner = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
    try:
        assert cli.main(["validator", "embed", "x", "--url", url, "--config", str(config)]) == 0
        assert cli.main(["validator", "embed", "x", "--url", url]) == 0  # the shipped config: btauth
        assert cli.main(["validator", "embed", "x", "--url", url, "--scheme", "epistula",
                         "--miner-hotkey", miner, "--config", str(tmp_path / "absent.yaml")]) == 0
    finally:
        server.shutdown()
        server.server_close()
    (first, first_body), (second, _), (third, third_body) = Recording.seen
    caller = epistula.verify(first, first_body, self_hotkey_ss58=miner, max_age_s=10, allowed_skew_s=2,
                             require_receiver=True)
    assert caller.hotkey == "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"  # //Alice
    assert "X-Bittensor-Signature" in second and "Epistula-Request-Signature" not in second
    assert epistula.verify(third, third_body, self_hotkey_ss58=miner, max_age_s=10, allowed_skew_s=2,
                           require_receiver=True)
