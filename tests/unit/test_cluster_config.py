"""cluster.yaml passes Ray's own cluster-launcher validation (no cloud is contacted)."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from serve_app.app import load_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


def load():
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_is_valid_for_ray():
    validate_config(prepare_config(load()))


def test_head_runs_no_replicas_and_only_on_demand_nodes_carry_on_demand():
    cfg = load()
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    spot = {n for n, t in types.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"}
    workers = {n for n in types if n != cfg["head_node_type"]}
    assert spot and spot < workers
    # The resource the miner's cluster config names: on every on-demand worker, on no spot one.
    miner = load_config(Path(__file__).resolve().parents[2] / "deployments" / "aws-cluster.yaml")
    name = miner.cluster.on_demand_resource
    assert all(name not in types[n]["resources"] for n in spot)
    assert all(types[n]["resources"].get(name, 0) >= 1 for n in workers - spot)
    assert all(types[n]["resources"].get("GPU", 0) >= 1 for n in workers)
    assert cfg["idle_timeout_minutes"] > 0


def test_a_wrong_key_is_rejected():
    bad = copy.deepcopy(load())
    bad["available_node_types"]["head"]["resourcez"] = {}
    with pytest.raises(Exception):
        validate_config(prepare_config(bad))
