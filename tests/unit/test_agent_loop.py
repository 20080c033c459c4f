"""The agent loop and tools with a scripted model: actions, errors fed back, retries,
timeouts, the deadline, the step limit and cancellation."""

import asyncio
import time

import pytest

from serve_app.agents.loop import run_agent
from serve_app.agents.tools import (CalculatorArgs, RetrieveArgs, ScratchpadArgs, Session, Tool, ToolError, calculator,
                                    make_retrieve, run_tool, scratchpad)
from serve_app.contracts import DeadlinePassed, Generation


CALC = Tool("calculator", CalculatorArgs, calculator)
PAD = Tool("scratchpad", ScratchpadArgs, scratchpad)


def script(*replies, delay_s=0.0):
    seen, grammars = [], []

    async def generate(conversation, grammar=None):
        seen.append(list(conversation))
        grammars.append(grammar)
        await asyncio.sleep(delay_s)
        return Generation(replies[min(len(seen) - 1, len(replies) - 1)], prompt_tokens=10, completion_tokens=3)

    generate.seen, generate.grammars = seen, grammars
    return generate


def run(generate, tools=(CALC, PAD), max_steps=5, timeout_s=5.0, session=None):
    return asyncio.run(run_agent("a task", list(tools), session or Session(), generate, max_steps,
                                 time.time() + timeout_s))


def test_tool_calls_then_answer_with_trace_and_usage():
    gen = script('{"tool": "calculator", "args": {"expression": "6*7"}}',
                 '{"tool": "scratchpad", "args": {"op": "set", "key": "x", "value": "42"}}',
                 '{"tool": "scratchpad", "args": {"op": "get", "key": "x"}}', '{"answer": "42"}')
    result = run(gen)
    assert result.answer == "42" and result.finish == "answer"
    assert [(s["tool"], s.get("result")) for s in result.steps] == [("calculator", 42), ("scratchpad", True),
                                                                  ("scratchpad", "42")]
    assert result.usage == {"prompt_tokens": 40, "completion_tokens": 12, "model_calls": 4}
    assert gen.seen[1][-1] == {"role": "user", "content": "result: 42"}  # the result went back to the model


@pytest.mark.parametrize("reply, error", [
    ("I think the answer is 4", "no JSON object"),
    ('{"tool": "shell", "args": {}}', "'shell' is not available"),
    ('{"tool": "calculator", "args": {"expr": "1"}}', "invalid args for calculator"),
    ('{"tool": "calculator", "args": {"expression": "__import__(1)"}}', "unknown function '__import__'"),
])
def test_bad_actions_are_fed_back_not_fatal(reply, error):
    gen = script(reply, '{"answer": "done"}')
    result = run(gen)
    assert result.answer == "done" and error in result.steps[0]["error"]
    assert gen.seen[1][-1]["content"].startswith("error: ")


def test_step_limit_ends_the_run_without_an_answer():
    result = run(script('{"tool": "calculator", "args": {"expression": "1"}}'), max_steps=3)
    assert result.finish == "max_steps" and result.answer is None and len(result.steps) == 3


def test_deadline_passes_while_the_model_thinks():
    with pytest.raises(DeadlinePassed):
        run(script('{"tool": "calculator", "args": {"expression": "1"}}', delay_s=0.1), timeout_s=0.25)


def test_retryable_failures_are_retried_and_others_not():
    calls = {"flaky": 0, "broken": 0}

    async def flaky(args, session):
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ToolError("503 from upstream", retryable=True)
        return "ok"

    async def broken(args, session):
        calls["broken"] += 1
        raise ToolError("bad request")

    assert asyncio.run(run_tool(Tool("flaky", CalculatorArgs, flaky, retries=2), {"expression": "1"}, Session())) == "ok"
    with pytest.raises(ToolError, match="bad request"):
        asyncio.run(run_tool(Tool("broken", CalculatorArgs, broken, retries=2), {"expression": "1"}, Session()))
    assert calls == {"flaky": 3, "broken": 1}


def test_a_slow_tool_times_out_and_the_run_goes_on():
    async def slow(args, session):
        await asyncio.sleep(5)

    tool = Tool("slow", CalculatorArgs, slow, timeout_s=0.05)
    started = time.perf_counter()
    result = run(script('{"tool": "slow", "args": {"expression": "1"}}', '{"answer": "gave up"}'), tools=[tool])
    assert result.answer == "gave up" and "timed out" in result.steps[0]["error"]
    assert time.perf_counter() - started < 1


def test_cancelling_a_run_cancels_its_tool():
    state = {}

    async def wait_forever(args, session):
        try:
            await asyncio.sleep(60)
        finally:
            state["cleaned_up"] = True

    async def scenario():
        task = asyncio.create_task(run_agent("t", [Tool("wait", CalculatorArgs, wait_forever, timeout_s=60)], Session(),
                                             script('{"tool": "wait", "args": {"expression": "1"}}'), 3,
                                             time.time() + 60))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert state == {"cleaned_up": True}


def test_retrieve_ranks_documents_by_similarity():
    async def embed(texts):
        axis = {"cats": (1.0, 0.0), "dogs": (0.0, 1.0)}
        return [axis["cats"] if "cat" in t else axis["dogs"] for t in texts]

    session = Session(documents=["all about dogs", "a cat sat", "dogs again"])
    found = asyncio.run(make_retrieve(embed)(RetrieveArgs(query="cats?", top_k=1), session))
    assert found == [{"index": 1, "score": 1.0, "text": "a cat sat"}]
    with pytest.raises(ToolError, match="no documents"):
        asyncio.run(make_retrieve(embed)(RetrieveArgs(query="x"), Session()))
