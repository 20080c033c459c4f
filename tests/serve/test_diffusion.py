"""The Diffusion workload through the signed path: answers, determinism under batching,
pipeline-call counts, specs kept apart, the result cache, limits and deadlines.

Determinism and batching are checked against a second app (prefix /nc) whose cache is
off, so every image there is rendered; the session's app (cache on) covers the cache.
"""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from ray import serve

from tests.conftest import delete_app, deploy_app

PATH = "/v1/images/generations"
NOCACHE_APP, NOCACHE = "images-nocache", "/nc"


@pytest.fixture(scope="module")
def nocache(miner, tmp_path_factory):
    deploy_app(miner, tmp_path_factory, NOCACHE_APP, netuid=3, prefix=NOCACHE, protocol="openai-images",
               workloads={"embeddings": None, "agents": None, "diffusion": {"cache_bytes": 0, "placement": {"num_cpus": 0.25}}},
               router={"num_replicas": 1, "num_cpus": 0.25})
    yield miner
    delete_app(NOCACHE_APP)


def images(resp) -> list[bytes]:
    assert resp.status_code == 200, resp.text
    return [base64.b64decode(item["b64_json"]) for item in resp.json()["data"]]


def stats(app=None) -> dict:
    return serve.get_deployment_handle("Diffusion", app or "miner").stats.remote().result()


def post_all(miner, payloads, path=PATH):
    with ThreadPoolExecutor(len(payloads)) as pool:
        return list(pool.map(lambda p: miner.post(p, path=path), payloads))


def test_answer_is_openai_shaped_png_with_seeds_and_spec(miner):
    resp = miner.post({"prompt": "a red fox", "seed": 42, "n": 2}, path=PATH)
    body = resp.json()
    assert [item["seed"] for item in body["data"]] == [42, 43]
    assert (body["preset"], body["steps"], body["size"]) == ("balanced", 4, "64x64")
    first, second = images(resp)
    assert first != second
    assert Image.open(io.BytesIO(first)).format == "PNG" and Image.open(io.BytesIO(first)).size == (64, 64)
    wide = miner.post({"prompt": "a red fox", "seed": 42, "size": "128x64", "steps": 2}, path=PATH)
    assert Image.open(io.BytesIO(images(wide)[0])).size == (128, 64)


def test_seeded_image_is_the_same_bytes_alone_or_batched(nocache):
    path = NOCACHE + PATH
    target = {"prompt": "a lighthouse at dusk", "seed": 7}
    alone = images(nocache.post(target, path=path))[0]
    before = stats(NOCACHE_APP)
    others = [{"prompt": f"filler {i}", "seed": 100 + i} for i in range(6)]
    answers = post_all(nocache, [target, *others, {"prompt": "a lighthouse at dusk", "seed": 5, "n": 3}], path)
    after = stats(NOCACHE_APP)
    assert after["largest_call"] >= 2 and after["pipeline_calls"] - before["pipeline_calls"] < 8
    assert images(answers[0])[0] == alone
    assert images(answers[-1])[2] == alone  # seed 5 + 2, inside a 3-image request
    assert len({images(a)[0] for a in answers[1:-1]}) == 6


def test_concurrent_requests_share_pipeline_calls(nocache):
    before = stats(NOCACHE_APP)
    answers = post_all(nocache, [{"prompt": f"a boat {i}", "seed": i, "preset": "fast"} for i in range(8)],
                       NOCACHE + PATH)
    assert all(a.status_code == 200 for a in answers)
    after = stats(NOCACHE_APP)
    assert after["images_rendered"] - before["images_rendered"] == 8
    # One call may start alone; the rest queue behind it and share calls of up to 4 images.
    assert after["pipeline_calls"] - before["pipeline_calls"] <= 4


def test_different_specs_never_share_a_call(nocache):
    path = NOCACHE + PATH
    fast = {"prompt": "a tree", "seed": 11, "preset": "fast"}
    fast_alone = images(nocache.post(fast, path=path))[0]
    before = stats(NOCACHE_APP)
    mixed = [fast, *({"prompt": f"t{i}", "seed": i, "preset": "fast"} for i in range(3)),
             *({"prompt": f"t{i}", "seed": i, "preset": "fast", "steps": 3} for i in range(4))]
    answers = post_all(nocache, mixed, path)
    after = stats(NOCACHE_APP)
    assert images(answers[0])[0] == fast_alone  # a 3-step neighbour would have changed its batch
    assert after["images_rendered"] - before["images_rendered"] == 8
    assert after["pipeline_calls"] - before["pipeline_calls"] >= 2
    assert images(answers[1])[0] != images(answers[4])[0]  # same prompt and seed, other steps


def test_cache_hit_answers_without_the_pipeline(miner):
    request = {"prompt": "a cached comet", "seed": 3, "preset": "quality"}
    first = images(miner.post(request, path=PATH))[0]
    before = stats()
    again = images(miner.post(request, path=PATH))[0]
    after = stats()
    assert again == first
    assert after["pipeline_calls"] == before["pipeline_calls"]
    assert after["cache"]["hits"] == before["cache"]["hits"] + 1
    # Seeds 2 and 3: only seed 2 is rendered.
    pair = images(miner.post({**request, "seed": 2, "n": 2}, path=PATH))
    assert pair[1] == first and stats()["images_rendered"] == after["images_rendered"] + 1
    # Another preset is another image.
    assert images(miner.post({**request, "preset": "balanced"}, path=PATH))[0] != first


@pytest.mark.parametrize("payload, field", [
    ({"prompt": "x", "steps": 17}, "steps"),
    ({"prompt": "x", "size": "256x256"}, "size"),
    ({"prompt": "x", "preset": "ultra"}, "preset"),
    ({"prompt": "x", "n": 5}, "n"),
    ({"prompt": ""}, "prompt"),
])
def test_limits_are_422_and_reach_no_model(miner, payload, field):
    before = stats()
    resp = miner.post(payload, path=PATH)
    assert resp.status_code == 422 and resp.json()["error"] == "limit_exceeded"
    assert resp.json()["detail"].startswith(field)
    assert stats() == before


def test_a_deadline_too_short_is_504_and_nothing_is_cached(nocache):
    resp = nocache.post({"prompt": "never rendered", "seed": 1, "preset": "quality", "size": "128x128", "steps": 16},
                        path=NOCACHE + PATH, headers={"X-Bittensor-Timeout": "0.01"})
    assert resp.status_code == 504 and resp.json()["error"] == "deadline_exceeded"


def test_info_lists_the_diffusion_model_and_presets(miner):
    info = miner.http.get("/info").json()["workloads"]["diffusion"]
    assert info["model"] == "torchrank/tiny-sd" and info["device"] == "cpu" and info["images_per_call"] == 4
    assert set(info["presets"]) == {"fast", "balanced", "quality"}


def test_validator_image_command_writes_pngs(miner, tmp_path, capsys):
    from serve_app.cli import main

    stem = tmp_path / "fox"
    assert main(["validator", "image", "a fox", "--seed", "9", "--n", "2", "--url", miner.url, "--out", str(stem)]) == 0
    written = sorted(tmp_path.glob("fox-*.png"))
    assert [p.name for p in written] == ["fox-10.png", "fox-9.png"]
    assert Image.open(written[1]).size == (64, 64)
    assert main(["validator", "image", "a fox", "--steps", "99", "--url", miner.url, "--out", str(stem)]) == 1
    assert "limit_exceeded" in capsys.readouterr().err
