"""Replica autoscaling end to end: a step of signed load scales the Embeddings workload up
through the latency/queue policy, and it comes back down after the load stops.

A second app (prefix /as) in the session's cluster: embeddings only, 1..2 replicas, a
short quiet period so the test stays bounded.
"""

import asyncio
import glob
import json
import os
from collections import Counter

import pytest
import ray
from bittensor.sp_core import Keypair
from ray import serve

from benchmarks.loadgen import Load
from tests.conftest import MINER, delete_app, deploy_app, wait_until

APP = "autoscale"
PREFIX = "/as"
PATH = PREFIX + "/v1/embeddings"


@pytest.fixture(scope="module")
def scaled(miner, tmp_path_factory):
    cfg = deploy_app(
        miner, tmp_path_factory, APP, netuid=5, prefix=PREFIX, protocol="openai-embeddings",
        workloads={"diffusion": None, "agents": None, "embeddings": dict(
            runtime={"torch_threads": 1}, degraded=None,
            placement={"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 2, "latency_slo_s": 1.0,
                                                         "target_queued": 16, "quiet_period_s": 3.0}})},
        router={"num_replicas": 1})
    yield cfg
    delete_app(APP)


def replicas() -> tuple[int, int]:
    """(running replicas, replicas running or starting) of the app's Embeddings."""
    states = serve.status().applications[APP].deployments["Embeddings"].replica_states
    return states.get("RUNNING", 0), states.get("RUNNING", 0) + states.get("STARTING", 0)


def wait_for(check, timeout_s: float, what: str):
    wait_until(check, timeout_s, lambda: f"{what} (replicas running, running or starting: {replicas()})", 0.25)


def admission_slots(miner) -> int:
    return miner.http.get(PREFIX + "/info").json()["admission"]["embeddings"]["max_in_flight"]


def controller_decisions() -> list[dict]:
    """The policy's decision lines for this app, from the Serve controller's log."""
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve")
    lines = []
    for path in glob.glob(os.path.join(logs, "controller_*.log")):
        with open(path) as f:
            for line in f:
                start = line.find('{"event": "autoscaling_decision"')
                if start >= 0:
                    decision = json.loads(line[start:].strip())
                    if decision["application"] == APP:
                        lines.append(decision)
    return lines


def test_a_load_step_scales_up_and_quiet_scales_down(miner, scaled):
    wait_for(lambda: replicas() == (1, 1), 60, "one replica at start")
    # The app was deployed just now: its router answers 503 unavailable until its monitor has
    # seen the workload ready (the full suite caught the load's first requests there).
    wait_for(lambda: miner.post({"input": "ready?"}, path=PATH).status_code == 200, 60, "the app answers")
    text = "validators score accuracy, reliability and latency of every answer a miner gives " * 3
    # A deadline long enough for a slow CPU: the second replica's start (a worker importing torch,
    # loading the model) takes CPU from the first, and the test is about scaling, not deadlines
    # (on a slow machine the subnet's default deadline shed and timed out some of the load).
    load = Load(miner.url, Keypair.create_from_uri("//Alice"), MINER,
                lambda i: (PATH, {"input": [f"{text} {i} {j}" for j in range(16)]}), timeout_s=90.0,
                headers={"X-Bittensor-Timeout": "60"})
    def under_load():
        wait_for(lambda: replicas()[1] == 2, 15, "a second replica starts under load")
        # A replica's start (a new worker importing torch, loading the model) takes tens of
        # seconds on 2 cores busy with the load, over 60 s in a slow hour: the load lasts until it runs.
        wait_for(lambda: replicas()[0] == 2, 120, "the second replica runs")
        # The router's admission bounds follow: twice the configured in-flight slots.
        wait_for(lambda: admission_slots(miner) == 2 * scaled.workloads.embeddings.load.admission.max_in_flight,
                 10, "admission bounds grow with the replicas")

    # 16 callers, 16 texts each, until the checks pass (a check that fails ends the test):
    # ~240 texts waiting on one replica, 15x the queue target.
    outcomes = asyncio.run(load.closed_loop(16, 150.0, during=under_load, until_during=True))
    assert outcomes and all(o.status == 200 for o in outcomes), Counter(f"{o.status} {o.error}" for o in outcomes)
    # Quiet for 3 s (and the replicas' 10 s latency window emptied): back to one.
    wait_for(lambda: replicas() == (1, 1), 60, "back to one replica after the load")
    wait_for(lambda: admission_slots(miner) == scaled.workloads.embeddings.load.admission.max_in_flight, 10,
             "admission bounds shrink back")
    decisions = controller_decisions()
    ups = [d for d in decisions if d["decision"] == "up"]
    downs = [d for d in decisions if d["decision"] == "down"]
    assert ups and ups[0]["reason"] in ("queue_over_target", "latency_over_slo") and ups[0]["replicas"] == 2
    assert downs and downs[-1]["reason"] == "quiet_period_over" and downs[-1]["replicas"] == 1
    assert ups[0]["inputs"]["queued_per_replica"] > 16 or ups[0]["inputs"]["p95_s"] > 0.8
    # The same decisions reach Prometheus from the Serve controller.
    wait_for(lambda: exported_decisions(miner) >= {"up", "down"}, 15, "decisions in the metrics")


def exported_decisions(miner) -> set[str]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(miner.metrics_url, timeout=5).text
    return {sample.labels["decision"] for family in text_string_to_metric_families(text)
            if family.name == "ray_torchrank_autoscaling_decisions"
            for sample in family.samples if sample.labels.get("application") == APP and sample.value > 0}
