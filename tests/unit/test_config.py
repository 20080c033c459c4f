from pathlib import Path

import pytest
import yaml
from bittensor.sp_core import Keypair
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
    assert cfg.workloads.embeddings.runtime.offline


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
    assert cfg.workloads.diffusion.model.default_preset in cfg.workloads.diffusion.model.presets


@pytest.mark.parametrize("diffusion, subnet_policy, match", [
    ({"model": {"default_preset": "ultra"}}, {}, "default_preset 'ultra'"),
    ({"limits": {"max_steps": 4}}, {}, "preset 'quality': 8 steps, over limits.max_steps"),
    ({"limits": {"max_side": 32, "min_side": 16}}, {}, "outside limits.min_side..max_side"),
    ({}, {"allowed_presets": ["fast", "turbo"]}, r"unknown presets \['turbo'\]"),
    ({}, {"allowed_presets": ["fast"]}, "default preset 'balanced' is not among allowed_presets"),
    ({"limits": {"max_steps": 16}}, {"max_steps": 17}, r"max_steps \(17\) is above the workload's \(16\)"),
    ({"limits": {"max_side": 512}}, {"max_side": 520}, r"max_side \(520\) is above the workload's \(512\)"),
    ({"limits": {"min_side": 64}}, {"max_side": 56}, r"max_side \(56\) is below the workload's min_side \(64\)"),
    ({}, {"max_steps": 3}, r"preset 'balanced': 4 steps, over the subnet's max_steps \(3\)"),
    ({}, {"default_preset": "quality", "max_steps": 6}, r"preset 'quality': 8 steps, over the subnet's max_steps"),
    ({}, {"allowed_presets": ["balanced", "quality"], "max_steps": 6}, r"preset 'quality': 8 steps"),
    ({"limits": {"min_side": 16}}, {"max_side": 32}, r"preset 'balanced': size 64x64 is over the subnet's max_side \(32\)"),
])
def test_diffusion_presets_are_checked_against_limits_and_subnets(diffusion, subnet_policy, match):
    subnet = {"netuid": 1, "metagraph": SNAPSHOT, "routes": [IMAGES], "diffusion": subnet_policy}
    with pytest.raises(ValidationError, match=match):
        MinerConfig.model_validate(args(subnets=[subnet], workloads={"diffusion": diffusion}))


def test_subnet_diffusion_limits_default_to_the_workloads_and_may_be_lower():
    subnet = {"netuid": 1, "metagraph": SNAPSHOT, "routes": [IMAGES],
              "diffusion": {"allowed_presets": ["fast", "balanced"], "max_steps": 4, "max_side": 64}}
    cfg = MinerConfig.model_validate(args(subnets=[subnet], workloads={"diffusion": {}}))
    assert (cfg.subnets[0].diffusion.max_steps, cfg.subnets[0].diffusion.max_side) == (4, 64)
    assert MinerConfig.model_validate(args(workloads={"diffusion": {}})).subnets[0].diffusion.max_steps is None


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


def test_embeddings_runtime_defaults():
    from serve_app.config import EmbeddingsConfig

    cfg = EmbeddingsConfig().runtime
    assert (cfg.backend, cfg.precision, cfg.min_cosine, cfg.cache_dir) == ("auto", "auto", 0.9999, "~/.cache/torchrank-miner")
    with pytest.raises(ValidationError, match="fp16"):  # replaced by precision: one way to say it
        EmbeddingsConfig(runtime={"fp16": True})


@pytest.mark.parametrize("fields, match", [
    ({"device": "cpu", "precision": "fp16"}, "fp16 runs on CUDA only"),
    ({"backend": "onnxruntime", "precision": "fp16"}, "fp16 runs on torch"),
    ({"backend": "openvino", "precision": "fp16"}, "fp16 runs on torch"),
    ({"backend": "onnxruntime", "precision": "bf16"}, "onnxruntime runs fp32 only"),
    ({"backend": "openvino", "device": "cuda"}, "openvino runs on CPU only"),
    ({"backend": "onnxruntime", "device": "cuda"}, "onnxruntime runs on CPU only"),
    ({"backend": "tensorrt"}, "backend"),
    ({"precision": "int8"}, "precision"),
    ({"min_cosine": 0}, "min_cosine"),
    ({"min_cosine": 1.0001}, "min_cosine"),
])
def test_embeddings_runtime_choices_that_cannot_run_are_refused(fields, match):
    from serve_app.config import EmbeddingsConfig

    with pytest.raises(ValidationError, match=match):
        EmbeddingsConfig(runtime=fields)


@pytest.mark.parametrize("fields", [
    {"device": "cuda", "precision": "fp16"}, {"device": "auto", "precision": "fp16"},  # auto -> cpu: refused at start
    {"device": "cpu", "backend": "openvino", "precision": "bf16"}, {"backend": "onnxruntime", "precision": "fp32"},
    {"backend": "torch", "precision": "bf16"}, {"min_cosine": 1.0},
])
def test_embeddings_runtime_choices_accepted(fields):
    from serve_app.config import EmbeddingsConfig

    assert EmbeddingsConfig(runtime=fields).runtime.model_dump(include=set(fields)) == fields


def test_router_gate_must_see_every_request_serve_lets_in():
    from serve_app.config import RouterConfig

    with pytest.raises(ValidationError, match="max_ongoing_requests .* below max_in_progress"):
        RouterConfig(max_ongoing_requests=256, max_in_progress=1024)


def test_admission_counts_are_safety_caps_above_the_embedded_default_load():
    """The deadline decides, not the counts: a 32-caller load (issue 14) is far inside every cap."""
    cfg = load_config("deployments/local.yaml")
    emb = cfg.workloads.embeddings
    admission = emb.load.admission
    assert admission.max_wait_s is None
    assert admission.max_in_flight >= 128 and admission.max_queued >= 512
    assert emb.in_flight_items == 2 * emb.batching.max_batch_texts
    assert cfg.router.max_in_progress >= admission.max_in_flight + admission.max_queued
    assert cfg.workloads.agents.in_flight_items == cfg.workloads.agents.load.max_ongoing_requests


def test_full_route_paths_must_not_collide_across_subnets(tmp_path):
    other = tmp_path / "m2.json"
    other.write_text('{"netuid": 2, "neurons": []}')
    subnets = [{"netuid": 1, "metagraph": SNAPSHOT, "routes": [{"path": "/sn2/x", "protocol": "openai-embeddings"}]},
               {"netuid": 2, "prefix": "/sn2", "metagraph": {"source": "snapshot", "path": str(other)},
                "routes": [{"path": "/x", "protocol": "openai-embeddings"}]}]
    with pytest.raises(ValidationError, match=r"/sn2/x is a route of both subnet 1 .* and subnet 2"):
        MinerConfig.model_validate(args(subnets=subnets))
    subnets[1]["routes"] = [{"path": "/y", "protocol": "openai-embeddings"}]
    MinerConfig.model_validate(args(subnets=subnets))


DEV_ADDRESSES = {uri: Keypair.create_from_uri(uri).ss58_address
                 for uri in ("//Alice", "//Bob", "//Charlie", "//Dave", "//Eve", "//Ferdie")}


def test_dev_key_list_matches_the_sdk():
    from serve_app.config import DEV_HOTKEYS

    assert DEV_HOTKEYS == {address: uri for uri, address in DEV_ADDRESSES.items()}


@pytest.mark.parametrize("uri", sorted(DEV_ADDRESSES))
def test_dev_keys_are_refused_in_the_allow_list_on_a_live_chain(uri):
    chain = {"netuid": 1, "metagraph": {"source": "chain"}, "auth": {"allow_hotkeys": [DEV_ADDRESSES[uri]]}}
    with pytest.raises(ValidationError, match=rf"subnets.0\n.*auth.allow_hotkeys holds the public dev key {uri}"):
        MinerConfig.model_validate(args(wallet={"name": "miner"}, subnets=[chain]))
    # Local use with a snapshot keeps them (deployments/local.yaml), and a deny-list may name them.
    MinerConfig.model_validate(args(subnets=[{"netuid": 1, "metagraph": SNAPSHOT,
                                              "auth": {"allow_hotkeys": [DEV_ADDRESSES[uri]]}}]))
    MinerConfig.model_validate(args(wallet={"name": "miner"}, subnets=[
        {"netuid": 1, "metagraph": {"source": "chain"}, "auth": {"deny_hotkeys": [DEV_ADDRESSES[uri]]}}]))


ALL_ROUTES = [{"path": "/v1/embeddings", "protocol": "openai-embeddings"}, IMAGES]


def test_router_gate_must_hold_what_admission_may_hold():
    # embeddings 256 + 512 and diffusion 64 + 256 (admission max_in_flight + max_queued), + 128 body reads
    # (router.max_body_reads) = 1216 per router replica.
    both = args(subnets=[{"netuid": 1, "metagraph": SNAPSHOT, "routes": ALL_ROUTES}], workloads={"diffusion": {}})
    with pytest.raises(ValidationError, match=r"router.max_in_progress \(1024\) is below the 1216 requests .*"
                                              r"embeddings 256\+512, diffusion 64\+256, router.max_body_reads 128"):
        MinerConfig.model_validate(both)
    assert MinerConfig.model_validate({**both, "router": {"max_in_progress": 1216}}).router.max_in_progress == 1216
    # Autoscaled, the caps grow with the replicas to max_replicas / min_replicas times (Admission.resize).
    scaled = {**both, "router": {"max_in_progress": 1216},
              "workloads": {"diffusion": {}, "embeddings": {"placement": {"autoscaling": {"min_replicas": 2, "max_replicas": 5}}}}}
    with pytest.raises(ValidationError, match=r"below the 2368 requests .*embeddings \(256\+512\) x 2.5"):
        MinerConfig.model_validate(scaled)
    # A workload no route uses holds nothing at the router.
    MinerConfig.model_validate(args(workloads={"diffusion": {}, "agents": {}}))


def test_readiness_fails_before_the_metagraph_stops_authorising():
    subnet = {"netuid": 1, "metagraph": {**SNAPSHOT, "max_age_s": 600}, "watchdog": {"max_metagraph_age_s": 900}}
    with pytest.raises(ValidationError, match=r"watchdog.max_metagraph_age_s \(900\) is above metagraph.max_age_s "
                                              r"\(600\)"):
        MinerConfig.model_validate(args(subnets=[subnet]))
    subnet["watchdog"]["max_metagraph_age_s"] = 600
    MinerConfig.model_validate(args(subnets=[subnet]))


def test_release_0_1_flat_workload_fields_are_read_into_their_sections_with_a_warning():
    from serve_app.config import EmbeddingsConfig

    with pytest.warns(DeprecationWarning, match=r"workloads.embeddings: .*offline -> runtime.offline, "
                                                r"max_batch_texts -> batching.max_batch_texts"):
        old = EmbeddingsConfig(model="some/model", runtime="torch", offline=True, max_batch_texts=128,
                               num_gpus=0.5, admission={"max_queued": 7})
    new = EmbeddingsConfig(model={"id": "some/model"}, runtime={"backend": "torch", "offline": True},
                           batching={"max_batch_texts": 128}, placement={"num_gpus": 0.5},
                           load={"admission": {"max_queued": 7}})
    assert old == new
    with pytest.raises(ValidationError, match="offline and runtime.offline are the same field"):
        EmbeddingsConfig(offline=True, runtime={"offline": False})


def test_the_shipped_configs_use_no_deprecated_field(recwarn):
    for path in Path("deployments").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        for app in doc.get("applications", []):
            MinerConfig.model_validate(app["args"])
    assert not [w for w in recwarn if "deprecated field names" in str(w.message)]


def test_a_section_given_in_part_keeps_the_rest_of_its_workloads_defaults():
    from serve_app.config import AgentToolsConfig, DiffusionConfig, EmbeddingsConfig

    load = EmbeddingsConfig(load={"max_ongoing_requests": 256}).load  # embeddings' own: 256 queued, admission 256+512
    assert (load.max_queued_requests, load.admission.max_in_flight, load.admission.max_queued) == (256, 256, 512)
    admission = EmbeddingsConfig(load={"admission": {"deadline_share": 0.7}}).load.admission
    assert (admission.max_in_flight, admission.max_queued, admission.deadline_share) == (256, 512, 0.7)
    assert AgentToolsConfig(calculator={"retries": 1}).calculator.timeout_s == 1.0  # the calculator's 1 s, not 5 s
    # A dict-valued field is replaced whole: the presets given are the presets.
    presets = DiffusionConfig(model={"presets": {"x": {"steps": 2, "width": 64, "height": 64}}, "default_preset": "x"})
    assert list(presets.model.presets) == ["x"]


def test_auth_scheme_and_endpoint_are_checked():
    base = args()
    subnet = base["subnets"][0]
    cfg = MinerConfig.model_validate({**base, "subnets": [{**subnet, "auth": {"scheme": "epistula"},
                                                           "endpoint": {"ip": "203.0.113.7", "port": 8091}}]})
    assert cfg.subnets[0].auth.scheme == "epistula" and cfg.subnets[0].auth.max_age_s == 10
    assert cfg.subnets[0].endpoint.port == 8091
    assert load_config("deployments/local.yaml").subnets[0].auth.scheme == "btauth"
    for bad, match in [({"auth": {"scheme": "jwt"}}, "scheme"), ({"endpoint": {"ip": "miner.example"}}, "not an IPv4"),
                       ({"endpoint": {"ip": "0.0.0.0"}}, "cannot be reached"),
                       ({"endpoint": {"ip": "1.2.3.4", "port": 0}}, "port")]:
        with pytest.raises(ValidationError, match=match):
            MinerConfig.model_validate({**base, "subnets": [{**subnet, **bad}]})
