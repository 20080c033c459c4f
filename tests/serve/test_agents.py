"""Agent runs through the signed path on the tiny real model: the answer shape, sessions
sharing batched model calls, limits, deadlines. (The loop's logic with a scripted model:
tests/unit/test_agent_loop.py; the tiny model's text is noise, so its actions are mostly
invalid and come back to it as errors.)"""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from ray import serve

PATH = "/v1/agents/runs"


def stats() -> dict:
    return serve.get_deployment_handle("Agents", "miner").stats.remote().result()


def test_a_run_answers_with_steps_and_usage(miner):
    resp = miner.post({"task": "what is 6 * 7?", "tools": ["calculator"], "max_steps": 2}, path=PATH)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["finish"] in ("answer", "max_steps") and len(body["steps"]) <= 2
    assert body["usage"]["model_calls"] >= 1 and body["usage"]["prompt_tokens"] > 0
    for step in body["steps"]:
        assert set(step) >= {"tool", "args", "ms"} and ("result" in step) != ("error" in step)


def test_concurrent_sessions_share_model_calls(miner):
    before = stats()
    payloads = [{"task": f"task {i}", "tools": ["calculator", "scratchpad"], "max_steps": 2} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: miner.post(p, path=PATH), payloads))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    after = stats()
    steps = after["model_steps"] - before["model_steps"]
    assert steps == sum(a.json()["usage"]["model_calls"] for a in answers)
    assert after["model_calls"] - before["model_calls"] < steps and after["largest_batch"] >= 2


@pytest.mark.parametrize("payload, field", [
    ({"task": "x", "tools": ["shell"]}, "tools"),
    ({"task": "x", "max_steps": 9}, "max_steps"),
    ({"task": "  "}, "task"),
    ({"task": "x" * 4001}, "task"),
    ({"task": "x", "documents": ["d"] * 33}, "documents"),
    ({"task": "x", "tools": ["http_fetch"]}, "tools"),  # off by default
])
def test_limits_are_422_and_reach_no_model(miner, payload, field):
    before = stats()
    resp = miner.post(payload, path=PATH)
    assert resp.status_code == 422 and resp.json()["detail"].startswith(field), resp.text
    assert stats() == before


def test_a_deadline_too_short_is_504(miner):
    resp = miner.post({"task": "x", "max_steps": 8}, path=PATH, headers={"X-Bittensor-Timeout": "0.02"})
    assert resp.status_code == 504 and resp.json()["error"] == "deadline_exceeded"


def test_a_run_past_its_deadline_is_cancelled_and_frees_its_slot(miner):
    before = stats()
    # Eight model steps take longer than 0.3 s here: the run is cut mid-way.
    resp = miner.post({"task": "a long task", "tools": ["calculator"], "max_steps": 8}, path=PATH,
                      headers={"X-Bittensor-Timeout": "0.3"})
    assert resp.status_code == 504, resp.text
    deadline = time.monotonic() + 10
    while stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    after = stats()
    assert after["in_flight"] == 0 and after["runs"] == before["runs"]  # cancelled, not finished
    assert after["model_steps"] - before["model_steps"] < 8


def test_info_lists_the_agents_model_and_tools(miner):
    info = miner.http.get("/info").json()["workloads"]["agents"]
    assert info["model"] == "torchrank/tiny-lm" and info["tools"] == ["calculator", "retrieve", "scratchpad"]


def test_validator_agent_command(miner, capsys):
    from serve_app.cli import main

    assert main(["validator", "agent", "add 2 and 2", "--tool", "calculator", "--max-steps", "1", "--url", miner.url]) == 0
    assert "finish=" in capsys.readouterr().out
    assert main(["validator", "agent", "x", "--tool", "shell", "--url", miner.url]) == 1
    assert "limit_exceeded" in capsys.readouterr().err
