"""Agents: 64 concurrent sessions, each needing 3 tool calls of 200 ms (issue 6).

    .venv/bin/python benchmarks/agents.py [--sessions 64]

The same machinery as the Agents replica, in-process: the tiny chat LM (`torchrank/tiny-lm`,
in its child process as in the replica), a CoalescingRunner that batches the model steps
of every waiting session, and `run_agent`. Model steps are real batched generation
(max_new_tokens from the embedded default); the *actions* are scripted, because a
random-weight model cannot choose tools: steps 1-3 call a `wait` tool that sleeps 200 ms,
step 4 answers. Reported: wall time of 64 concurrent sessions against the ideal
(4 batched model calls of 64 sessions + 3 x 200 ms of overlapped tool waits), and the
same 64 sessions run one at a time. Results go to benchmarks/results/agents.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydantic import BaseModel  # noqa: E402

from serve_app.agents.loop import run_agent, system_prompt  # noqa: E402
from serve_app.agents.tools import Session, Tool  # noqa: E402
from serve_app.app import load_config  # noqa: E402
from serve_app.contracts import Generation  # noqa: E402
from serve_app.engines.llm import LLMEngine  # noqa: E402
from serve_app.inference.coalesce import CoalescingRunner  # noqa: E402
from serve_app.inference.process import EngineProcess  # noqa: E402
from serve_app.inference.thread import EngineThread  # noqa: E402

TOOL_S = 0.2
TOOL_CALLS = 3


class WaitArgs(BaseModel):
    pass


async def wait(args, session):
    await asyncio.sleep(TOOL_S)
    return "done"


def scripted(runner: CoalescingRunner):
    """A real batched model step whose action text is then replaced by the script's."""

    async def generate(conversation):
        (generations,) = await runner.run([conversation])
        real = generations[0]
        done = sum(1 for m in conversation if m["role"] == "assistant")
        text = '{"answer": "finished"}' if done >= TOOL_CALLS else '{"tool": "wait", "args": {}}'
        return Generation(text, real.prompt_tokens, real.completion_tokens)

    return generate


async def sessions(runner, count: int, concurrent: bool) -> float:
    tools = [Tool("wait", WaitArgs, wait, timeout_s=5)]
    generate = scripted(runner)

    def one(i):
        return run_agent(f"session {i}: wait three times, then answer", tools, Session(), generate, 8, time.time() + 600)

    started = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*(one(i) for i in range(count)))
    else:
        results = [await one(i) for i in range(count)]
    assert all(r.finish == "answer" and len(r.steps) == TOOL_CALLS for r in results)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/agents.json"))
    args = parser.parse_args()
    cfg = load_config(ROOT / "deployments/local.yaml").workloads.agents
    cfg = cfg.model_copy(update={
        "runtime": cfg.runtime.model_copy(update={"cache_dir": tempfile.mkdtemp(prefix="torchrank-bench-")}),
        "batching": cfg.batching.model_copy(update={"max_batch_sessions": max(cfg.batching.max_batch_sessions,
                                                                              args.sessions)})})
    thread = EngineThread("agents")
    engine = EngineProcess(LLMEngine, cfg, cfg.runtime.torch_threads or 1)
    runner = CoalescingRunner(thread, lambda convs: (engine.generate(convs),), max_items=cfg.batching.max_batch_sessions)

    # The ideal's model part: one batched call of all sessions per step, with each step's
    # conversations exactly as the loop builds them (the best of 3 runs of each).
    tools = [Tool("wait", WaitArgs, wait, timeout_s=5)]
    step_s = []
    for step in range(TOOL_CALLS + 1):
        history = [{"role": "assistant", "content": '{"tool": "wait", "args": {}}'},
                   {"role": "user", "content": 'result: "done"'}] * step
        batch = [[{"role": "system", "content": system_prompt(tools)},
                  {"role": "user", "content": f"session {i}: wait three times, then answer"}, *history]
                 for i in range(args.sessions)]
        times = []
        for _ in range(3):
            started = time.perf_counter()
            engine.generate(batch)
            times.append(time.perf_counter() - started)
        step_s.append(min(times))
    ideal = sum(step_s) + TOOL_CALLS * TOOL_S

    concurrent = asyncio.run(sessions(runner, args.sessions, concurrent=True))
    passes = runner.passes
    one_at_a_time = asyncio.run(sessions(runner, args.sessions, concurrent=False))
    engine.close()
    results = {"sessions": args.sessions, "tool_calls_per_session": TOOL_CALLS, "tool_s": TOOL_S,
               "batched_call_s_per_step": [round(t, 3) for t in step_s], "ideal_s": round(ideal, 2),
               "concurrent_s": round(concurrent, 2), "concurrent_over_ideal": round(concurrent / ideal, 2),
               "model_calls_concurrent": passes, "one_at_a_time_s": round(one_at_a_time, 2),
               "speedup": round(one_at_a_time / concurrent, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
