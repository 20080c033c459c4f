"""Rollouts end to end: a candidate embeddings model beside the stable one, on a compressed
schedule, decided by the miner itself while signed validator traffic flows."""

import threading
import time

import numpy as np
import pytest
from ray import serve

from benchmarks.candidates import FAILING_WORD, candidate_model, minilm_path
from tests.conftest import deploy_app, ss58, wait_until

VALIDATORS = ["//Alice", "//Val1", "//Val2", "//Val3", "//Val4", "//Val5"]
NEURONS = [{"uid": i, "hotkey": ss58(uri), "validator_permit": True, "total_stake": 1000.0}
           for i, uri in enumerate(VALIDATORS)]
# Compressed: a second of traffic per stage, every request mirrored, verdicts on a few samples.
# Latency is judged loosely here: two models on two shared cores (the unit tests hold the rule).
FAST = {"weight": 1.0, "steps": [0.5, 1.0], "step_s": 1.0, "min_comparisons": 5, "min_samples": 5,
        "shadow_share": 1.0, "max_shadow_in_flight": 8, "max_latency_ratio": 5.0, "latency_slack_s": 1.0}
TEXTS = ["the cat sat on the mat", "validators score miners", "a short sentence", "rollouts need care"]


def deploy(miner, tmp_path_factory, name: str, netuid: int, model: str, **canary):
    prefix = f"/{name}"
    deploy_app(miner, tmp_path_factory, name, netuid=netuid, prefix=prefix, protocol="openai-embeddings",
               neurons=NEURONS, workloads={"diffusion": None, "agents": None, "embeddings": {
                   "model": {"id": str(minilm_path())},
                   "runtime": {"backend": "torch", "precision": "fp32"},  # no conversion per candidate
                   "canary": {**FAST, **canary, "model": model}}})
    return prefix


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
    model = candidate_model(tmp_path_factory.mktemp("noisy"), noise=0.5)
    prefix = deploy(miner, tmp_path_factory, "rollout-noisy", 21, model)
    try:
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
    finally:
        serve.delete("rollout-noisy")


def test_a_candidate_identical_to_stable_is_promoted_and_then_serves_everyone(miner, tmp_path_factory, ref):
    model = candidate_model(tmp_path_factory.mktemp("same"))
    prefix = deploy(miner, tmp_path_factory, "rollout-same", 22, model)
    try:
        with Traffic(miner, prefix, TEXTS) as traffic:
            wait_until(lambda: rollout(miner, prefix)["state"] == "promoted", 90,
                       lambda: f"promoted: {rollout(miner, prefix)}")
        state = rollout(miner, prefix)
        assert state["weight"] == 1.0 and state["served"]["candidate"] > 0 and state["comparisons"] >= 15, state
        assert_all_stable(traffic.answers, ref)
        calls = lambda name: serve.get_deployment_handle(name, "rollout-same").stats.remote().result()["forward_calls"]
        time.sleep(1.0)  # every router replica has synced the decision
        before = calls("Embeddings"), calls("EmbeddingsCandidate")
        for v in VALIDATORS:
            assert miner.post({"input": TEXTS[:1]}, key=v, path=prefix + "/v1/embeddings").status_code == 200
        assert calls("Embeddings") == before[0] and calls("EmbeddingsCandidate") > before[1]
        info = miner.http.get(prefix + "/info").json()["workloads"]["embeddings"]
        assert info["model"] == model  # the serving side's identity
    finally:
        serve.delete("rollout-same")


def test_a_candidate_that_errors_is_rolled_back_with_no_failed_request(miner, tmp_path_factory, ref):
    model = candidate_model(tmp_path_factory.mktemp("broken"), failing_word=FAILING_WORD)
    prefix = deploy(miner, tmp_path_factory, "rollout-broken", 23, model, step_s=4.0)  # time to switch texts
    try:
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
    finally:
        serve.delete("rollout-broken")
