"""One Ray cluster and one Serve app for the whole session, started only if a test asks.

The app is the embedded default (deployments/local.yaml, under deployments/ray.env: the
embeddings and the tiny diffusion model) with a richer metagraph snapshot and two router replicas, served on a free loopback port so a
running `make run` is not disturbed. A second subnet (EPISTULA_NETUID, under EPISTULA_PREFIX)
takes Epistula v2 signatures on an embeddings route, beside subnet 1's btauth/1.
"""

import json
import socket
import time

import httpx
import pytest
from bittensor.sp_core import Keypair

from serve_app import rayenv
from serve_app.app import load_config
from serve_app.client import signed_request

APP = "miner"
EPISTULA_NETUID, EPISTULA_PREFIX = 6, "/epistula"


def ss58(uri: str) -> str:
    return Keypair.create_from_uri(uri).ss58_address


MINER = ss58("//Bob")
TEST_LIMITS = {"limits": {"max_texts_per_request": 16, "max_chars_per_text": 2000}, "batching": {"max_batch_texts": 32}}


def deep_update(base: dict, update: dict) -> dict:
    """`base` with `update` merged in, section by section (a None or a non-dict value replaces)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = (deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict)
                    else value)
    return out


# The miner's standing in the session's snapshots (subnet 1 publishes its axon at the session's port).
BOB_STANDING = {"incentive": 0.25, "emission": 12.0, "trust": 0.9, "consensus": 0.25, "rank": 0.25,
                "pruning_score": 0.125, "block_at_registration": 0}


def snapshot_neurons(bob_axon=None):
    def neuron(uid, uri, permit, stake, **standing):
        return {"uid": uid, "hotkey": ss58(uri), "validator_permit": permit, "total_stake": stake, **standing}

    return [
        neuron(0, "//Alice", True, 10000.0),
        neuron(1, "//Bob", False, 0.0, **BOB_STANDING, axon=bob_axon),
        neuron(2, "//Charlie", False, 10.0),
        neuron(3, "//Poor", True, 50.0),  # permit, stake under min_stake
        neuron(4, "//Denied", True, 10000.0),  # would pass, but deny-listed
    ]  # //Dave absent; //Allowed absent but allow-listed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def miner(tmp_path_factory):
    import ray
    from ray import serve

    from serve_app.app import build_app

    port = free_port()
    snapshots = tmp_path_factory.mktemp("metagraph")
    # Subnet 1's chain axon is the configured endpoint (127.0.0.1, the session's port); the
    # Epistula subnet's is not.
    for netuid, axon in ((1, f"127.0.0.1:{port}"), (EPISTULA_NETUID, "10.0.0.9:8091")):
        (snapshots / f"{netuid}.json").write_text(json.dumps({
            "netuid": netuid, "block": 1000, "tempo": 99, "price": 0.5, "immunity_period": 100, "max_uids": 5,
            "neurons": snapshot_neurons(bob_axon=axon)}))
    base = load_config("deployments/local.yaml")
    models = str(tmp_path_factory.mktemp("models"))
    subnet = base.subnets[0].model_copy(
        update={
            "metagraph": base.subnets[0].metagraph.model_copy(update={"path": str(snapshots / "1.json")}),
            "auth": base.subnets[0].auth.model_copy(
                update={"min_stake": 100.0, "allow_hotkeys": (ss58("//Allowed"),), "deny_hotkeys": (ss58("//Denied"),)}
            ),
        }
    )
    epistula = subnet.model_copy(update={
        "netuid": EPISTULA_NETUID, "prefix": EPISTULA_PREFIX,
        "metagraph": base.subnets[0].metagraph.model_copy(update={"path": str(snapshots / f"{EPISTULA_NETUID}.json")}),
        "routes": tuple(r for r in subnet.routes if r.protocol == "openai-embeddings"),
        "auth": subnet.auth.model_copy(update={"scheme": "epistula", "max_age_s": 8.0})})
    cfg = base.model_copy(
        update={
            "subnets": (subnet, epistula),
            "router": base.router.model_copy(update={"num_replicas": 2, "num_cpus": 0.25, "max_body_bytes": 65536,
                                                    "body_timeout_s": 2.0}),
            # The session's own ledger; the routers hand their counts on every second.
            "ledger": base.ledger.model_copy(update={"path": str(tmp_path_factory.mktemp("ledger") / "ledger.sqlite"),
                                                     "flush_s": 1.0}),
        }
    )
    # The shipped runtime choice (auto: openvino bf16 on a bf16 CPU), converted into the session's cache.
    runtime = {"runtime": {"cache_dir": models, "torch_threads": 1}}
    cfg = type(cfg).model_validate(deep_update(cfg.model_dump(), {"workloads": {
        "embeddings": deep_update(TEST_LIMITS, runtime), "diffusion": runtime,
        "agents": {"runtime": {"cache_dir": models}}}}))
    # The miner's Ray environment for the cluster started below. This driver imported
    # ray.serve already (above), so its own handles keep their default event-loop mode.
    # HAProxy's stats and metrics listeners on free ports too: a running `make run` keeps its own.
    rayenv.apply(RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()), RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
                 RAY_metrics_report_interval_ms="1000",  # metrics reach the exporter in 1 s, not 10
                 TORCHRANK_HAPROXY_REQUEST_TIMEOUT="2s")  # as router.body_timeout_s below: slow-body tests stay short
    metrics_port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    miner = Miner(f"http://127.0.0.1:{port}", cfg, metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")
    # The replicas are up, but on 2 cores the first seconds after a start are busy (workers still
    # importing, warm-ups): the session's tests start once a signed request is answered.
    wait_until(lambda: miner.post({"input": "warm up"}).status_code == 200, 60, "a first signed request answered")
    yield miner
    serve.shutdown()
    ray.shutdown()


def app_config(miner, tmp_path_factory, app: str, netuid: int, prefix: str, protocol: str, workloads: dict,
               router: dict | None = None, subnet: dict | None = None, neurons: list | None = None):
    """The config of a second app in the session's cluster: the session app's with one subnet at
    `prefix` serving one protocol's route, `workloads` updated (None turns one off), its own
    metagraph snapshot (by default //Alice, a permitted validator)."""
    from serve_app.protocols.registry import PROTOCOLS

    snapshot = tmp_path_factory.mktemp(app) / "metagraph.json"
    neurons = neurons or [{"uid": 0, "hotkey": ss58("//Alice"), "validator_permit": True, "total_stake": 1000.0}]
    snapshot.write_text(json.dumps({"netuid": netuid, "block": 1, "neurons": neurons}))
    args = miner.cfg.model_dump()
    args["name"] = f"torchrank-{app}"
    args["ledger"]["path"] = str(snapshot.parent / "ledger.sqlite")
    for name, update in workloads.items():
        args["workloads"][name] = None if update is None else deep_update(args["workloads"][name], update)
    args["router"].update(router or {})
    first = args["subnets"][0]
    args["subnets"] = [first]  # one subnet (the session's Epistula subnet stays the session app's)
    path = next(r["path"] for r in first["routes"] if r["protocol"] == protocol)
    first.update(netuid=netuid, prefix=prefix, routes=[{"path": path, "protocol": protocol}], **(subnet or {}))
    first["metagraph"]["path"] = str(snapshot)
    first["auth"].update(min_stake=0.0, allow_hotkeys=(), deny_hotkeys=())
    assert args["workloads"][PROTOCOLS[protocol].workload] is not None
    return type(miner.cfg).model_validate(args)


def deploy_app(miner, tmp_path_factory, app: str, netuid: int, prefix: str, protocol: str, workloads: dict, **kw):
    """app_config's app, deployed from Python (serve.run). Returns its config."""
    from ray import serve

    from serve_app.app import build_app

    cfg = app_config(miner, tmp_path_factory, app, netuid, prefix, protocol, workloads, **kw)
    serve.run(build_app(cfg), name=app, route_prefix=prefix)
    return cfg


def delete_app(name: str) -> None:
    """Delete a test app without waiting: a Router replica drains its direct ingress for
    RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (30 s) before it stops, which the next module
    need not wait for (its replicas free their CPU shares in seconds)."""
    from ray import serve

    serve.delete(name, _blocking=False)


def deploy_from_config(apps: dict[str, tuple[str, object]], timeout_s: float = 180.0) -> None:
    """Apps (name -> (route prefix, MinerConfig)) deployed as `make run` deploys them: from one
    config (import_path + args) through the Serve controller; waits until they all run."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [
        {"name": name, "route_prefix": prefix, "import_path": "serve_app.app:build_app",
         "args": cfg.model_dump(mode="json")} for name, (prefix, cfg) in apps.items()]}))

    def statuses():
        found = serve.status().applications
        return {name: found[name].status if name in found else "absent" for name in apps}

    wait_until(lambda: set(statuses().values()) == {"RUNNING"}, timeout_s, lambda: f"apps running: {statuses()}")


def wait_until(check, timeout_s: float, what, interval_s: float = 0.5):
    """Poll `check` until true; past `timeout_s` fail, naming `what` (a string, or a
    function giving one, e.g. with the state at the time)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return
        time.sleep(interval_s)
    raise AssertionError(f"not within {timeout_s}s: {what() if callable(what) else what}")


class Miner:
    def __init__(self, url, cfg, metrics_url):
        self.url = url
        self.cfg = cfg
        self.metrics_url = metrics_url
        self.http = httpx.Client(base_url=url, timeout=60)

    def post(self, payload, key="//Alice", path="/v1/embeddings", receiver=MINER, headers=None, scheme="btauth", **kw):
        body, signed = signed_request(Keypair.create_from_uri(key), path, payload, receiver, scheme=scheme)
        return self.http.post(path, content=body, headers={**signed, **(headers or {})}, **kw)

    def workload_stats(self, deployment="Embeddings", app=APP) -> dict:
        from ray import serve

        return serve.get_deployment_handle(deployment, app).stats.remote().result()
