import pytest
from pydantic import ValidationError
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

from serve_app.app import build_app, load_config
from serve_app.config import MinerConfig

SNAPSHOT = {"source": "snapshot", "path": "deployments/local-metagraph.json"}


def args(**over):
    base = {"wallet": {"uri": "//Bob"}, "subnets": [{"netuid": 1, "metagraph": SNAPSHOT}]}
    base.update(over)
    return base


def test_embedded_default_is_valid():
    cfg = load_config("deployments/local.yaml")
    assert cfg.wallet.hotkey_ss58() == "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
    assert cfg.subnets[0].netuid == 1 and cfg.subnets[0].auth.require_receiver
    assert cfg.workloads.embeddings.offline


def test_dev_key_refused_with_a_live_chain():
    with pytest.raises(ValidationError, match="dev key"):
        MinerConfig.model_validate(args(subnets=[{"netuid": 1, "metagraph": {"source": "chain"}}]))


def test_wallet_uri_accepts_only_dev_keys():
    with pytest.raises(ValidationError, match="dev keys"):
        MinerConfig.model_validate(args(wallet={"uri": "bottom drive obey lake curtain smoke basket hold race lonely fit walk"}))
    with pytest.raises(ValidationError, match="exactly one"):
        MinerConfig.model_validate(args(wallet={"uri": "//Bob", "name": "miner"}))


def test_missing_wallet_file_is_a_clear_error(tmp_path):
    cfg = MinerConfig.model_validate(args(wallet={"name": "nobody", "path": str(tmp_path)}))
    with pytest.raises(ValueError, match="cannot read the public hotkey of wallet 'nobody'"):
        cfg.wallet.hotkey_ss58()


@pytest.mark.parametrize(
    "bad, field",
    [
        (args(subnets=[{"netuid": 1, "metagraph": SNAPSHOT, "auth": {"max_age_s": -1}}]), "subnets.0.auth.max_age_s"),
        (args(subnets=[{"netuid": 1, "metagraph": SNAPSHOT, "autth": {}}]), "subnets.0.autth"),
        (args(workloads={"embeddings": {"max_texts_per_request": 100, "max_batch_texts": 10}}), "workloads.embeddings"),
        (args(subnets=[{"netuid": 1, "metagraph": {"source": "ipfs"}}]), "subnets.0.metagraph"),
    ],
)
def test_serve_builder_names_the_bad_field(bad, field):
    # The same call `serve run` makes with a config's `args:`.
    with pytest.raises(ValidationError) as err:
        call_user_app_builder_with_args_if_necessary(build_app, bad)
    assert field in str(err.value)


def test_subnets_must_not_collide():
    with pytest.raises(ValidationError, match="duplicate netuid"):
        MinerConfig.model_validate(args(subnets=[{"netuid": 1, "metagraph": SNAPSHOT}] * 2))
    with pytest.raises(ValidationError, match="share a prefix"):
        MinerConfig.model_validate(
            args(subnets=[{"netuid": 1, "metagraph": SNAPSHOT}, {"netuid": 2, "metagraph": SNAPSHOT}])
        )


def test_route_needs_its_workload():
    with pytest.raises(ValidationError, match="needs workload 'embeddings'"):
        MinerConfig.model_validate(args(workloads={"embeddings": None}))


IMAGES = {"path": "/v1/images/generations", "protocol": "openai-images"}


def test_images_route_needs_the_diffusion_workload():
    with pytest.raises(ValidationError, match="needs workload 'diffusion'"):
        MinerConfig.model_validate(args(subnets=[{"netuid": 1, "metagraph": SNAPSHOT, "routes": [IMAGES]}]))
    cfg = MinerConfig.model_validate(args(subnets=[{"netuid": 1, "metagraph": SNAPSHOT, "routes": [IMAGES]}],
                                          workloads={"diffusion": {}}))
    assert cfg.workloads.diffusion.default_preset in cfg.workloads.diffusion.presets


@pytest.mark.parametrize("diffusion, subnet_policy, match", [
    ({"default_preset": "ultra"}, {}, "default_preset 'ultra'"),
    ({"max_steps": 4}, {}, "preset 'quality': 8 steps, over max_steps"),
    ({"max_side": 32, "min_side": 16}, {}, "outside min_side..max_side"),
    ({}, {"allowed_presets": ["fast", "turbo"]}, r"unknown presets \['turbo'\]"),
    ({}, {"allowed_presets": ["fast"]}, "default preset 'balanced' is not among allowed_presets"),
])
def test_diffusion_presets_are_checked_against_limits_and_subnets(diffusion, subnet_policy, match):
    subnet = {"netuid": 1, "metagraph": SNAPSHOT, "routes": [IMAGES], "diffusion": subnet_policy}
    with pytest.raises(ValidationError, match=match):
        MinerConfig.model_validate(args(subnets=[subnet], workloads={"diffusion": diffusion}))


def test_builder_checks_snapshot_file(tmp_path):
    missing = args(subnets=[{"netuid": 1, "metagraph": {"source": "snapshot", "path": str(tmp_path / "none.json")}}])
    with pytest.raises(ValueError, match="metagraph.path"):
        call_user_app_builder_with_args_if_necessary(build_app, missing)


def test_builder_module_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, serve_app.app; "
            "print(*(m in sys.modules for m in ('torch', 'sentence_transformers', 'diffusers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


def test_slo_objectives_are_validated_with_their_field():
    bad = args(subnets=[{"netuid": 1, "metagraph": SNAPSHOT, "slo": {"availability_objective": 1.0}}])
    with pytest.raises(ValidationError, match="subnets.0.slo.availability_objective"):
        MinerConfig.model_validate(bad)
    ok = MinerConfig.model_validate(args(subnets=[{"netuid": 1, "metagraph": SNAPSHOT, "slo": {"latency_s": 0.25}}]))
    assert ok.subnets[0].slo.latency_s == 0.25 and ok.subnets[0].slo.availability_objective == 0.995
