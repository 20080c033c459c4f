"""Node autoscaling on a fake multi-node cluster (Ray's fake_multinode provider): fractional
-GPU replicas placed by the miner's `with_placement()` make the cluster autoscaler add GPU worker
nodes of the right type, work that is not preemption-safe never lands on a spot node, and
idle nodes are removed. Runs in under a minute; `make test-cluster` runs it alone.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serve_app import rayenv
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = Path(__file__).with_name("fake-cluster.yaml")


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    import ray._private.services as services

    address = f"{services.get_node_ip_address()}:{free_port()}"
    config = yaml.safe_load(TEMPLATE.read_text())
    config["provider"]["gcs_address"] = address
    path = tmp_path_factory.mktemp("fake-cluster") / "autoscaling.yaml"
    path.write_text(yaml.safe_dump(config))
    # Plain Ray for this cluster: not the miner's Serve settings the test session may have exported.
    env = {k: v for k, v in os.environ.items() if k not in rayenv.read() and not k.startswith("RAY_SERVE_HAPROXY")}
    # Token authentication as on a real cluster, with a token of its own (none may exist on this machine).
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32))
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # Its own process group: the head and every fake node it starts go down together at the end,
    # without `ray stop` (which would stop every Ray cluster on the machine).
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={address.rsplit(':', 1)[1]}", "--num-cpus=0",
         f"--autoscaling-config={path}", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything that ignored SIGTERM
        except ProcessLookupError:
            pass
        # `ray start` left its address as the machine's default cluster: a later plain ray.init() would try it.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip() == address:
            current.unlink()


def test_fractional_gpu_replicas_scale_nodes_up_spot_only_for_safe_work_and_idle_nodes_go(fake_cluster):
    address, env = fake_cluster
    run = subprocess.run([sys.executable, "-m", "tests.cluster.placement_driver", address], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=400)
    phases = {p["phase"]: p for p in (json.loads(line) for line in run.stdout.splitlines() if line.startswith("{"))}
    assert run.returncode == 0 and set(phases) == {"serve", "unsafe", "safe", "idle"}, run.stderr[-3000:]
    print("phases (seconds, seconds since the driver started):",  # shown with -s
          {name: (p.get("seconds"), p["since_start"]) for name, p in phases.items()})

    unsafe = phases["unsafe"]
    # 3 replicas at 0.5 GPU: two on-demand GPU nodes were added, and no spot node.
    assert len(unsafe["workers"]) == 2 and all(w.get("on_demand") == 1 for w in unsafe["workers"])
    assert len(unsafe["nodes"]) == 3 and all(n.get("on_demand") == 1 for n in unsafe["nodes"])

    safe = phases["safe"]
    # The on-demand type is at its max_workers: the preemption-safe replicas got spot nodes.
    spot = [w for w in safe["workers"] if "on_demand" not in w]
    assert len(spot) == 2 and len(safe["workers"]) == 4
    assert len(safe["nodes"]) == 2 and all("on_demand" not in n for n in safe["nodes"])

    # Nothing deployed: every worker node removed (idle_timeout_minutes 0.2).
    assert phases["idle"]["workers"] == []
