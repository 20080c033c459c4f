"""How the builder places and sizes replicas: the autoscaling policy's config, spot
exclusion, GPU memory caps (no Ray cluster: the built deployments are inspected)."""

import json

import pytest
from pydantic import ValidationError
from ray.serve._private.build_app import build_app as built

from serve_app.app import build_app
from serve_app.config import MinerConfig, Placement

SNAPSHOT = {"source": "snapshot", "path": "deployments/local-metagraph.json"}
EMBED = {"path": "/v1/embeddings", "protocol": "openai-embeddings"}
IMAGES = {"path": "/v1/images/generations", "protocol": "openai-images"}


def deployments(**args) -> dict:
    # A gate above what the autoscaled workloads' admission may hold at max_replicas (MinerConfig checks it).
    cfg = MinerConfig.model_validate({"wallet": {"uri": "//Bob"}, "router": {"max_in_progress": 4096}, **args})
    return {d.name: d for d in built(build_app(cfg), name="t").deployments}


def snapshot(tmp_path, netuid: int) -> dict:
    path = tmp_path / f"metagraph-{netuid}.json"
    path.write_text(json.dumps({"netuid": netuid, "block": 1, "neurons": []}))
    return {"source": "snapshot", "path": str(path)}


def test_autoscaled_workload_gets_the_latency_queue_policy(tmp_path):
    deps = deployments(
        subnets=[{"netuid": 1, "metagraph": SNAPSHOT, "routes": [EMBED], "slo": {"latency_s": 2.0}},
                 {"netuid": 2, "prefix": "/b", "metagraph": snapshot(tmp_path, 2), "routes": [EMBED],
                  "slo": {"latency_s": 0.5}},
                 # The strictest SLO of all, but no route to embeddings: it does not count for them.
                 {"netuid": 3, "prefix": "/c", "metagraph": snapshot(tmp_path, 3), "routes": [IMAGES],
                  "slo": {"latency_s": 0.1}}],
        workloads={"embeddings": {"max_batch_texts": 48, "max_texts_per_request": 16,
                                  "autoscaling": {"min_replicas": 2, "max_replicas": 6, "quiet_period_s": 20}},
                   "diffusion": {"num_replicas": 2}})
    scaling = deps["Embeddings"]._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (2, 6)
    assert (scaling.upscale_delay_s, scaling.downscale_delay_s) == (0, 0)  # the policy keeps the delays
    assert scaling.policy.policy_function == "serve_app.ops.autoscaling:LatencyQueuePolicy"
    kwargs = scaling.policy.policy_kwargs
    assert kwargs["latency_slo_s"] == 0.5 and kwargs["target_queued"] == 48 and kwargs["quiet_period_s"] == 20
    # Serve can build the policy it was given.
    assert scaling.policy.get_policy()(**kwargs).latency_up_s == pytest.approx(0.4)
    # Without autoscaling: a fixed count.
    assert deps["Diffusion"]._deployment_config.autoscaling_config is None
    assert deps["Diffusion"]._deployment_config.num_replicas == 2


def test_explicit_thresholds_win():
    deps = deployments(subnets=[{"netuid": 1, "metagraph": SNAPSHOT}], workloads={"embeddings": {
        "autoscaling": {"latency_slo_s": 3.0, "target_queued": 5}}})
    kwargs = deps["Embeddings"]._deployment_config.autoscaling_config.policy.policy_kwargs
    assert (kwargs["latency_slo_s"], kwargs["target_queued"]) == (3.0, 5)


def test_only_preemption_safe_workloads_may_land_on_spot_nodes():
    subnets = [{"netuid": 1, "metagraph": SNAPSHOT, "routes": [EMBED, IMAGES]}]
    workloads = {"embeddings": {}, "diffusion": {"preemption_safe": True}}
    deps = deployments(subnets=subnets, workloads=workloads, cluster={"on_demand_resource": "on_demand"})
    resources = {name: d.ray_actor_options.get("resources", {}) for name, d in deps.items()}
    assert resources == {"Router": {"on_demand": 0.001}, "Embeddings": {"on_demand": 0.001}, "Diffusion": {}}
    # On one machine (no such resource set), nothing extra is required.
    deps = deployments(subnets=subnets, workloads=workloads)
    assert all(not d.ray_actor_options.get("resources") for d in deps.values())


def test_sizing_is_fixed_or_autoscaled_not_both():
    with pytest.raises(ValidationError, match="num_replicas or autoscaling"):
        Placement(num_replicas=3, autoscaling={})
    with pytest.raises(ValidationError, match="below min_replicas"):
        Placement(autoscaling={"min_replicas": 3, "max_replicas": 2})


def test_gpu_memory_cap_follows_the_fraction():
    assert Placement(num_gpus=0.25).memory_cap == 0.25
    assert Placement(num_gpus=1).memory_cap is None  # a whole GPU: no cap
    assert Placement(num_gpus=0.5, gpu_memory_fraction=0.3).memory_cap == 0.3
    assert Placement().memory_cap is None
