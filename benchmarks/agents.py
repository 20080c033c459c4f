"""Agents: continuous batching and the cost of constrained decoding (issues 6 and 21).

    .venv/bin/python benchmarks/agents.py [--sessions 64]

The Agents replica's machinery in-process: the tiny chat LM (`torchrank/tiny-lm`, in its
child process as in the replica, 1 torch thread) behind a ContinuousRunner, as
deployments/local.yaml configures it.

Phase 1, scheduling: 64 concurrent sessions of 3 model steps each, with a 200 ms tool wait
after each step. The actions are real decoding under a grammar that fixes each action's
length (an answer of exactly N characters; N from 8 to 160 by session and step), so the
lengths are mixed as a real agent's are: a short call and a long answer. Three schedules:
  - continuous: a step joins the running batch and leaves it when its action is complete;
  - static: a batch forms when the last one has finished, so every step waits for the
    longest in its batch (the schedule of the engine before issue 21, which decoded each
    batch to its end);
  - one at a time: max_batch_sessions 1.
Reported per schedule: time to the end of all sessions, engine calls, forward passes,
tokens decoded and tokens decoded per second (answered work only: every session must end
with its 3 steps complete, and the counts say so).

Phase 2, grammar cost: compiling the step grammar of the four built-in tools (first time,
then from the cache), and decoding 64 rows of 64 tokens with and without a grammar: the
per-token masking cost against plain decoding.

Results go to benchmarks/results/agents.json.
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

from serve_app.agents.calls import parse_action  # noqa: E402
from serve_app.agents.grammar import GrammarCache, step_schema_text  # noqa: E402
from serve_app.agents.tools import CalculatorArgs, FetchArgs, RetrieveArgs, ScratchpadArgs  # noqa: E402
from serve_app.app import load_config  # noqa: E402
from serve_app.engines.llm import LLMEngine, resolve_model_path  # noqa: E402
from serve_app.inference.continuous import ContinuousRunner  # noqa: E402
from serve_app.inference.process import EngineProcess  # noqa: E402
from serve_app.inference.thread import EngineThread  # noqa: E402

TOOL_S = 0.2
STEPS = 3
LENGTHS = (8, 24, 64, 160)  # characters of an action's answer
FRAME = len('{"answer": ""}')  # the characters around it: a byte token each for the tiny LM's tokenizer


def exact_answer(length: int) -> str:
    return json.dumps({"type": "object", "properties": {"answer": {"type": "string", "minLength": length,
                                                                   "maxLength": length}},
                       "required": ["answer"], "additionalProperties": False}, separators=(",", ":"))


def action_length(session: int, step: int) -> int:
    return LENGTHS[(session * 7 + step * 3) % len(LENGTHS)]


async def sessions(runner: ContinuousRunner, count: int) -> dict:
    async def one(i: int) -> int:
        conversation = [{"role": "user", "content": f"session {i}: three steps, then answer"}]
        done = 0
        for step in range(STEPS):
            length = action_length(i, step)
            # A non-ASCII character is 2-4 byte tokens: the budget leaves room for them all.
            generation = await runner.run(conversation, exact_answer(length), max_new_tokens=4 * length + FRAME)
            assert len(parse_action(generation.text, set()).text) == length  # as the agent loop reads it
            conversation += [{"role": "assistant", "content": generation.text}, {"role": "user", "content": "ok"}]
            await asyncio.sleep(TOOL_S)
            done += 1
        return done

    before = (runner.passes, runner.forward_passes, runner.tokens)
    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    wall = time.perf_counter() - started
    completed = sum(1 for r in results if r == STEPS)
    tokens = runner.tokens - before[2]
    errors = sorted({f"{type(r).__name__}: {r}"[:120] for r in results if isinstance(r, BaseException)})
    return {"wall_s": round(wall, 2), "sessions_completed": completed, "sessions_failed": count - completed,
            "errors": errors,
            "engine_calls": runner.passes - before[0], "forward_passes": runner.forward_passes - before[1],
            "tokens_decoded": tokens, "tokens_per_s": round(tokens / wall, 1), "largest_batch": runner.largest_pass}


def grammar_cost(engine: LLMEngine, rows: int) -> dict:
    tools = [(n, a.model_json_schema()) for n, a in (("calculator", CalculatorArgs), ("scratchpad", ScratchpadArgs),
                                                      ("retrieve", RetrieveArgs), ("http_fetch", FetchArgs))]
    cache = GrammarCache(engine.tokenizer, engine.vocab_size)
    step = step_schema_text(tools, answer_only=False)
    started = time.perf_counter()
    cache.matcher(step)
    first = time.perf_counter() - started
    started = time.perf_counter()
    cache.matcher(step)
    cached = time.perf_counter() - started
    conversations = [[{"role": "user", "content": f"row {i}"}] for i in range(rows)]
    grammar = exact_answer(64 - FRAME)
    timings = {}
    for name, grammars in (("plain", None), ("constrained", [grammar] * rows)):
        best = None
        for _ in range(3):
            mask_before, tokens_before = engine.mask_s, engine.tokens_decoded
            started = time.perf_counter()
            engine.generate(conversations, max_new_tokens=64, grammars=grammars)
            seconds = time.perf_counter() - started
            tokens = engine.tokens_decoded - tokens_before
            if best is None or seconds < best[0]:
                best = (seconds, tokens, engine.mask_s - mask_before)
        seconds, tokens, mask_s = best
        timings[name] = {"s": round(seconds, 3), "tokens": tokens, "us_per_token": round(seconds / tokens * 1e6, 1),
                         "mask_us_per_token": round(mask_s / tokens * 1e6, 1)}
    overhead = timings["constrained"]["s"] / timings["plain"]["s"] - 1
    return {"compile_four_tools_ms": round(first * 1000, 2), "cached_ms": round(cached * 1000, 3),
            "decode_64_rows_x_64_tokens": timings, "constrained_over_plain": f"{overhead:+.1%}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/agents.json"))
    args = parser.parse_args()
    cfg = load_config(ROOT / "deployments/local.yaml").workloads.agents
    cfg = cfg.model_copy(update={
        "runtime": cfg.runtime.model_copy(update={"cache_dir": tempfile.mkdtemp(prefix="torchrank-bench-")})})
    threads = cfg.runtime.torch_threads or 1
    thread = EngineThread("agents")
    engine = EngineProcess(LLMEngine, cfg, threads)
    results = {"sessions": args.sessions, "steps_per_session": STEPS, "tool_s": TOOL_S,
               "action_chars": list(LENGTHS), "max_batch_sessions": cfg.batching.max_batch_sessions}
    for name, mode, rows in (("continuous", "continuous", cfg.batching.max_batch_sessions),
                             ("static", "static", cfg.batching.max_batch_sessions),
                             ("one_at_a_time", "continuous", 1)):
        runner = ContinuousRunner(thread, engine.decode, max_rows=rows, mode=mode)
        results[name] = asyncio.run(sessions(runner, args.sessions))
        print(name, json.dumps(results[name]), flush=True)
    engine.close()
    resolve_model_path(cfg.model.id, cfg.runtime.cache_dir)
    local = LLMEngine(cfg, threads)  # in this process: its counters and tokenizer are read directly
    results["grammar"] = grammar_cost(local, rows=64)
    print("grammar", json.dumps(results["grammar"]), flush=True)
    c, s = results["continuous"], results["static"]
    results["continuous_speedup_over_static"] = round(s["wall_s"] / c["wall_s"], 2)
    results["continuous_speedup_over_one_at_a_time"] = round(results["one_at_a_time"]["wall_s"] / c["wall_s"], 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if "speedup" in k}))


if __name__ == "__main__":
    main()
