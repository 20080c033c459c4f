"""The driver of the fake multi-node cluster test (its own process: the test session may
already be connected to another Ray cluster). Places replicas with the miner's own
`with_placement()` and prints what happened as one JSON line per phase.

    python -m tests.cluster.placement_driver GCS_ADDRESS
"""

import json
import sys
import time

import ray
from ray import serve

from serve_app.app import with_placement
from serve_app.config import EmbeddingsConfig, MinerConfig


@serve.deployment
class Probe:
    """Stands in for a workload: placement is under test here, not a model."""

    def __init__(self, cfg):
        self.where = (serve.get_replica_context().replica_id.unique_id, ray.get_runtime_context().get_node_id())

    def placed_on(self) -> tuple[str, str]:
        return self.where


def worker_nodes() -> dict[str, dict]:
    """Alive worker nodes: {node id: resources} (the head advertises no CPU)."""
    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}


def nodes_of(app: str, replicas: int) -> list[dict]:
    """The resources of the nodes the app's replicas run on, one entry per replica."""
    handle = serve.get_deployment_handle("Probe", app)
    seen = {}
    deadline = time.monotonic() + 30
    while len(seen) < replicas and time.monotonic() < deadline:
        replica, node = handle.placed_on.remote().result()
        seen[replica] = node
    assert len(seen) == replicas, f"{app}: reached {len(seen)} of {replicas} replicas"
    workers = worker_nodes()
    return [workers[node] for node in seen.values()]


BEGAN = time.monotonic()


def report(**fields) -> None:
    print(json.dumps({**fields, "since_start": round(time.monotonic() - BEGAN, 1)}), flush=True)


def main(address: str) -> None:
    ray.init(address=address, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    report(phase="serve")
    miner = MinerConfig.model_validate({
        "wallet": {"uri": "//Bob"}, "cluster": {"on_demand_resource": "on_demand"},
        "subnets": [{"netuid": 1, "metagraph": {"source": "snapshot", "path": "deployments/local-metagraph.json"}}]})

    # Not preemption-safe, 3 replicas at half a GPU: two on-demand GPU nodes come up.
    unsafe = EmbeddingsConfig(placement={"num_replicas": 3, "num_cpus": 0.5, "num_gpus": 0.5})
    started = time.monotonic()
    serve.run(with_placement(Probe, unsafe, "embeddings", miner).bind(unsafe), name="unsafe", route_prefix=None)
    report(phase="unsafe", seconds=round(time.monotonic() - started, 1), nodes=nodes_of("unsafe", 3),
           workers=list(worker_nodes().values()))

    # Preemption-safe, 2 replicas of a whole GPU: the on-demand type is at its max with half a GPU
    # free on one node, so spot nodes come up for them.
    safe = EmbeddingsConfig(placement={"num_replicas": 2, "num_cpus": 0.5, "num_gpus": 1.0, "preemption_safe": True})
    started = time.monotonic()
    serve.run(with_placement(Probe, safe, "embeddings", miner).bind(safe), name="safe", route_prefix=None)
    report(phase="safe", seconds=round(time.monotonic() - started, 1), nodes=nodes_of("safe", 2),
           workers=list(worker_nodes().values()))

    # No work left: the idle nodes are removed.
    serve.delete("unsafe")
    serve.delete("safe")
    started = time.monotonic()
    while worker_nodes() and time.monotonic() - started < 90:
        time.sleep(1)
    report(phase="idle", seconds=round(time.monotonic() - started, 1), workers=list(worker_nodes().values()))
    serve.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
