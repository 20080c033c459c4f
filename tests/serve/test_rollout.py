"""Rollouts end to end: a candidate embeddings model beside the stable one, on a compressed
schedule, decided by the miner itself while signed validator traffic flows."""

import json
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
import ray
import yaml
from ray import serve

from benchmarks.candidates import FAILING_WORD, candidate_model, minilm_path
from serve_app.config import CanaryConfig
from serve_app.router.rollouts import rollout_coordinator
from tests.conftest import app_config, delete_app, deploy_from_config, ss58, wait_until

VALIDATORS = ["//Alice", "//Val1", "//Val2", "//Val3", "//Val4", "//Val5"]
NEURONS = [{"uid": i, "hotkey": ss58(uri), "validator_permit": True, "total_stake": 1000.0}
           for i, uri in enumerate(VALIDATORS)]
# Compressed: a second of traffic per stage, every request mirrored, verdicts on a few samples.
# Latency is judged loosely here: two models on two shared cores (the unit tests hold the rule).
FAST = {"weight": 1.0, "steps": [0.5, 1.0], "step_s": 1.0, "min_comparisons": 5, "min_samples": 5,
        "shadow_share": 1.0, "max_shadow_in_flight": 8, "max_latency_ratio": 5.0, "latency_slack_s": 1.0}
TEXTS = ["the cat sat on the mat", "validators score miners", "a short sentence", "rollouts need care"]


def deploy(miner, tmp_path_factory, name: str, netuid: int, model: str, **canary) -> str:
    """An app with `model` as the candidate beside the stable MiniLM, deployed from a config as
    `make run` deploys (so the losing side of a decision can be retired). One such app at a time:
    a config holds every app deployed from one, so this one replaces the last. Returns its prefix."""
    app, prefix = f"rollout-{name}", f"/rollout-{name}"
    cfg = app_config(miner, tmp_path_factory, app, netuid=netuid, prefix=prefix, protocol="openai-embeddings",
                     neurons=NEURONS, router={"num_replicas": 1},
                     # The losing side is retired after the longest deadline (+2 s): keep it short here.
                     subnet={"timeout_s": 5.0, "max_timeout_s": 5.0}, workloads={
                         "diffusion": None, "agents": None, "embeddings": {
                             "model": {"id": str(minilm_path())},
                             "runtime": {"backend": "torch", "precision": "fp32"},  # no conversion per candidate
                             "placement": {"num_cpus": 0.25},
                             "canary": {**FAST, **canary, "model": model}}})
    deploy_from_config({app: (prefix, cfg)})
    return prefix


@pytest.fixture(scope="module", autouse=True)
def cleanup():
    yield
    for app in serve.status().applications:
        if app.startswith("rollout-"):
            delete_app(app)


def retired(app: str, deployment: str) -> bool:
    """The deployment's replica has freed its model (the losing side of a decision)."""
    return serve.get_deployment_handle(deployment, app).info.remote().result().get("status") == "retired"


def rollout(miner, prefix) -> dict:
    return miner.http.get(prefix + "/info").json()["workloads"]["embeddings"]["rollout"]


class Traffic:
    """Signed requests from every validator, in a loop on a thread, until stopped."""

    def __init__(self, miner, prefix, texts):
        self.miner, self.path, self.texts = miner, prefix + "/v1/embeddings", texts
        self.answers: list[tuple[int, list[str], object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        i = 0
        while not self._stop.is_set():
            texts = [self.texts[(i + j) % len(self.texts)] for j in range(2)]
            resp = self.miner.post({"input": texts}, key=VALIDATORS[i % len(VALIDATORS)], path=self.path)
            self.answers.append((resp.status_code, texts, resp.json()))
            i += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)


def reference(texts) -> dict[str, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    return dict(zip(texts, model.encode(texts, normalize_embeddings=True)))


def assert_all_stable(answers, ref):
    assert answers and {status for status, _, _ in answers} == {200}, [a[2] for a in answers if a[0] != 200][:3]
    for _, texts, body in answers:
        for text, item in zip(texts, body["data"]):
            assert float(np.dot(ref[text], item["embedding"])) > 0.999, text


@pytest.fixture(scope="module")
def ref():
    return reference(TEXTS + [f"a {FAILING_WORD} crossed the road"])


def test_a_candidate_that_disagrees_is_rolled_back_and_validators_keep_stables_answers(miner, tmp_path_factory, ref):
    prefix = deploy(miner, tmp_path_factory, "noisy", 21, candidate_model(tmp_path_factory.mktemp("noisy"), noise=0.5))
    with Traffic(miner, prefix, TEXTS) as traffic:
        wait_until(lambda: rollout(miner, prefix)["state"] == "rolled_back", 60,
                   lambda: f"rolled back: {rollout(miner, prefix)}")
    state = rollout(miner, prefix)
    assert state["reason"].startswith("disagrees"), state
    assert state["served"]["candidate"] == 0  # rolled back in shadow: no validator saw it
    assert state["stable"]["weights_sha256"] != state["candidate"]["weights_sha256"]
    assert_all_stable(traffic.answers, ref)
    # After the rollback every answer is stable's, with no mirroring.
    after = [miner.post({"input": TEXTS[:2]}, key=v, path=prefix + "/v1/embeddings") for v in VALIDATORS]
    assert_all_stable([(r.status_code, TEXTS[:2], r.json()) for r in after], ref)
    # The candidate's deployment is retired (its model freed), the stable one untouched.
    wait_until(lambda: retired("rollout-noisy", "EmbeddingsCandidate"), 30, "the candidate retired")
    assert not retired("rollout-noisy", "Embeddings")
    # Exported with both digests: the state, each side's calls, the comparisons.
    digests = f'candidate_digest="{state["candidate"]["weights_sha256"]}"', f'stable_digest="{state["stable"]["weights_sha256"]}"'
    wanted = {"state": lambda l: l.startswith("ray_torchrank_rollout_state{") and 'state="rolled_back"' in l
              and all(d in l for d in digests) and l.endswith(" 1.0"),
              "candidate calls": lambda l: l.startswith("ray_torchrank_rollout_calls_total{") and 'role="candidate"' in l
              and f'digest="{state["candidate"]["weights_sha256"]}"' in l,
              "disagreements": lambda l: l.startswith("ray_torchrank_rollout_comparisons_total{")
              and 'result="disagree"' in l}

    def exported():
        lines = [l for l in httpx.get(miner.metrics_url, timeout=10).text.splitlines()
                 if 'application="rollout-noisy"' in l]
        return {name for name, match in wanted.items() if any(match(l) for l in lines)}

    wait_until(lambda: exported() == set(wanted), 30, lambda: f"rollout metrics: {exported()}")


def test_a_candidate_identical_to_stable_is_promoted_and_then_serves_everyone(miner, tmp_path_factory, ref):
    model = candidate_model(tmp_path_factory.mktemp("same"))
    prefix = deploy(miner, tmp_path_factory, "same", 22, model)
    with Traffic(miner, prefix, TEXTS) as traffic:
        wait_until(lambda: rollout(miner, prefix)["state"] == "promoted", 90,
                   lambda: f"promoted: {rollout(miner, prefix)}")
    state = rollout(miner, prefix)
    assert state["weight"] == 1.0 and state["served"]["candidate"] > 0 and state["comparisons"] >= 15, state
    assert_all_stable(traffic.answers, ref)
    # The old stable deployment is retired; the candidate answers everyone.
    wait_until(lambda: retired("rollout-same", "Embeddings"), 30, "the old stable retired")
    calls = lambda: serve.get_deployment_handle("EmbeddingsCandidate", "rollout-same").stats.remote().result()[
        "forward_calls"]
    before = calls()
    after = [miner.post({"input": TEXTS[:1]}, key=v, path=prefix + "/v1/embeddings") for v in VALIDATORS]
    assert_all_stable([(r.status_code, TEXTS[:1], r.json()) for r in after], ref)
    assert calls() > before
    wait_until(lambda: miner.http.get(prefix + "/info").json()["workloads"]["embeddings"]["model"] == model, 10,
               "/info names the serving side's model")


def test_a_candidate_that_errors_is_rolled_back_with_no_failed_request(miner, tmp_path_factory, ref, tmp_path):
    model = candidate_model(tmp_path_factory.mktemp("broken"), failing_word=FAILING_WORD)
    # step_s: time to switch its texts once it reaches the canary.
    prefix = deploy(miner, tmp_path_factory, "broken", 23, model, step_s=4.0)
    with Traffic(miner, prefix, TEXTS) as agreeable:  # texts it can answer: it reaches the canary
        wait_until(lambda: rollout(miner, prefix)["state"] == "canary", 60,
                   lambda: f"in canary: {rollout(miner, prefix)}")
    failing = [f"a {FAILING_WORD} crossed the road"]
    with Traffic(miner, prefix, failing) as traffic:  # now every call to the candidate fails
        wait_until(lambda: rollout(miner, prefix)["state"] == "rolled_back", 60,
                   lambda: f"rolled back: {rollout(miner, prefix)}")
    state = rollout(miner, prefix)
    assert state["reason"].startswith("fails more"), state
    assert_all_stable(agreeable.answers, ref)
    assert_all_stable(traffic.answers, ref)  # each one the candidate failed, stable answered
    # The operator reads it, and a decision by hand on a decided rollout is refused.
    config = miner_config(tmp_path, "torchrank-rollout-broken")
    shown = cli("rollout", "status", "--config", str(config), "--url", miner.url + prefix, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["embeddings"]["state"] == "rolled_back", shown
    table = cli("rollout", "status", "--config", str(config), "--url", miner.url + prefix)
    assert table.stdout.startswith("embeddings: rolled_back, candidate serves 0%"), table
    again = cli("rollout", "promote", "--workload", "embeddings", "--config", str(config),
                "--address", ray.get_runtime_context().gcs_address)
    assert again.returncode == 1 and "already rolled_back" in again.stderr, (again.stdout, again.stderr)


def miner_config(tmp_path, name: str):
    """A serve config naming the miner `name` (whose coordinator the CLI asks)."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"applications": [{
        "name": name, "import_path": "serve_app.app:build_app",
        "args": {"name": name, "wallet": {"uri": "//Bob"},
                 "subnets": [{"netuid": 1, "metagraph": {"source": "snapshot",
                                                          "path": "deployments/local-metagraph.json"}}]}}]}))
    return config


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve_app.cli", *args], capture_output=True, text=True, timeout=120)


def test_an_operator_promotes_or_rolls_back_by_hand(miner, tmp_path):
    """`rollout promote|rollback` reach the miner's coordinator on the local Ray cluster (the
    routers take its state every half second, as after an automatic decision)."""
    canary = CanaryConfig(model="/models/candidate")
    address = ray.get_runtime_context().gcs_address
    for action, state in (("promote", "promoted"), ("rollback", "rolled_back")):
        name = f"torchrank-by-hand-{action}"
        coordinator = rollout_coordinator(name)
        ray.get(coordinator.begin.remote("embeddings", canary.model_dump_json(), "/models/stable", canary.model))
        done = cli("rollout", action, "--workload", "embeddings", "--config", str(miner_config(tmp_path, name)),
                   "--address", address)
        assert done.returncode == 0 and f"embeddings: {state}" in done.stdout, (done.stdout, done.stderr)
        assert ray.get(coordinator.states.remote())["embeddings"]["reason"] == f"{action} by the operator"
        ray.kill(coordinator)
    absent = cli("rollout", "promote", "--workload", "embeddings", "--config",
                 str(miner_config(tmp_path, "torchrank-no-rollout")), "--address", address)
    assert absent.returncode == 1 and "runs no rollout" in absent.stderr, absent.stderr

