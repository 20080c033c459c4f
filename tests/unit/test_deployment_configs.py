"""Every serve config in deployments/ is valid for Serve and for the miner, and the GPU
ones pack their workloads onto the GPU as their comments say."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.app import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "deployments").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid_for_serve_and_the_miner(path):
    ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    load_config(path)


def enabled(cfg):
    """Each enabled workload's placement."""
    return {name: wl.placement for name in ("embeddings", "diffusion", "agents") if (wl := getattr(cfg.workloads, name))}


def test_gpu_configs_fit_one_gpu_with_capped_memory():
    gpu = [p for p in CONFIGS if p.name.startswith("gpu-")]
    assert len(gpu) >= 2
    for path in gpu:
        workloads = enabled(load_config(path))
        # Each replica on a fraction of the GPU, capped at no more of its memory than that.
        assert all(0 < wl.num_gpus < 1 and wl.memory_cap <= wl.num_gpus for wl in workloads.values()), path
    one_node = enabled(load_config(next(p for p in gpu if p.name == "gpu-one-node.yaml")))
    assert set(one_node) == {"embeddings", "diffusion", "agents"}
    assert sum(wl.num_gpus for wl in one_node.values()) <= 1.0
    single = enabled(load_config(next(p for p in gpu if p.name == "gpu-single-subnet.yaml")))["embeddings"]
    # At most as many replicas as fractions fit on the GPU.
    assert single.autoscaling.max_replicas * single.num_gpus <= 1.0


def test_cluster_config_keeps_unsafe_work_off_spot():
    cfg = load_config(next(p for p in CONFIGS if p.name == "aws-cluster.yaml"))
    assert cfg.cluster.on_demand_resource == "on_demand"
    assert [name for name, wl in enabled(cfg).items() if wl.preemption_safe] == ["diffusion"]
    assert all(wl.autoscaling is not None for wl in enabled(cfg).values())
