"""cluster.yaml passes Ray's own cluster-launcher validation (no cloud is contacted)."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


def load():
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_is_valid_for_ray():
    validate_config(prepare_config(load()))


def test_head_runs_no_replicas_and_spot_is_marked():
    cfg = load()
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    spot = [t for t in types.values() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot and all(t["resources"].get("preemptible") == 1 for t in spot)
    assert all("preemptible" not in t["resources"] for t in types.values() if t not in spot)


def test_a_wrong_key_is_rejected():
    bad = copy.deepcopy(load())
    bad["available_node_types"]["head"]["resourcez"] = {}
    with pytest.raises(Exception):
        validate_config(prepare_config(bad))
