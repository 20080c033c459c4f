"""The agent loop: the model proposes an action, a tool runs, its result goes back, until an
answer, the step limit or the deadline.

The model is any `generate(conversation, grammar) -> Generation` coroutine: in the
deployment it queues the step into the continuous batch shared with other sessions
(serve_app/engines/llm.py), decoded under `grammar`, the JSON schema of an action
(serve_app/agents/grammar.py): a call of an offered tool with valid args or an answer, and
on the last allowed step an answer only, so a run ends with an answer. In tests it can be a
script. The action is still parsed and checked here: a script, or a step the engine could
not close, is not trusted. The trace records every step with its tool, args, result or
error and time; `on_step` sees each step as it is recorded (streaming).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

from serve_app.agents.calls import Answer, InvalidAction, parse_action
from serve_app.agents.grammar import step_schema_text
from serve_app.agents.tools import Session, Tool, ToolError, run_tool
from serve_app.contracts import DeadlinePassed, Generation


Generate = Callable[[list[dict], Optional[str]], Awaitable[Generation]]
MAX_RESULT_CHARS = 2000  # of a tool result fed back to the model


def system_prompt(tools: list[Tool]) -> str:
    lines = ["You solve the user's task step by step. Reply with exactly one JSON object:",
             '{"tool": "<name>", "args": {...}} to call a tool, or {"answer": "<text>"} to finish.', "Tools:"]
    for tool in tools:
        lines.append(f"- {tool.name}: args {json.dumps(tool.args.model_json_schema().get('properties', {}))}")
    return "\n".join(lines)


@dataclass
class RunResult:
    answer: Optional[str]
    finish: str  # "answer" | "max_steps"
    steps: list[dict]
    usage: dict

    def as_dict(self) -> dict:
        return {"answer": self.answer, "finish": self.finish, "steps": self.steps, "usage": self.usage}


def step_grammars(tools: list[Tool]) -> tuple[str, str]:
    """(any action, answer only): the two grammars of a run's steps."""
    return _grammars(tuple((tool.name, tool.args) for tool in tools))


@functools.lru_cache(maxsize=256)
def _grammars(offered: tuple) -> tuple[str, str]:
    schemas = [(name, args.model_json_schema()) for name, args in offered]
    return step_schema_text(schemas, answer_only=False), step_schema_text(schemas, answer_only=True)


async def run_agent(task: str, tools: list[Tool], session: Session, generate: Generate, max_steps: int,
                    deadline: float, on_step: Optional[Callable[[dict], None]] = None) -> RunResult:
    """`deadline` is time.time(); past it, DeadlinePassed (the caller answers 504)."""
    by_name = {tool.name: tool for tool in tools}
    any_action, answer_only = step_grammars(tools)
    conversation = [{"role": "system", "content": system_prompt(tools)}, {"role": "user", "content": task}]
    steps: list[dict] = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "model_calls": 0}
    record = steps.append if on_step is None else (lambda step: (steps.append(step), on_step(step)))
    for number in range(max_steps):
        if time.time() >= deadline:
            raise DeadlinePassed()
        generation = await generate(conversation, answer_only if number == max_steps - 1 else any_action)
        usage["model_calls"] += 1
        usage["prompt_tokens"] += generation.prompt_tokens
        usage["completion_tokens"] += generation.completion_tokens
        conversation.append({"role": "assistant", "content": generation.text})
        started = time.perf_counter()
        try:
            action = parse_action(generation.text, set(by_name))
        except InvalidAction as exc:
            record({"tool": None, "args": None, "error": str(exc), "ms": 0.0})
            conversation.append({"role": "user", "content": f"error: {exc}"})
            continue
        if isinstance(action, Answer):
            return RunResult(action.text, "answer", steps, usage)
        tool = by_name[action.tool]
        remaining = deadline - time.time()
        if remaining <= 0:
            raise DeadlinePassed()
        step = {"tool": tool.name, "args": action.args}
        try:
            if remaining < tool.timeout_s:  # the run's deadline comes first: one try, cut to fit
                tool = dataclasses.replace(tool, timeout_s=remaining, retries=0)
            result = await run_tool(tool, action.args, session)
            step["result"] = result
            feedback = "result: " + json.dumps(result, default=str)[:MAX_RESULT_CHARS]
        except ToolError as exc:
            step["error"] = str(exc)
            feedback = f"error: {exc}"
        step["ms"] = round((time.perf_counter() - started) * 1000, 1)
        record(step)
        conversation.append({"role": "user", "content": feedback})
    return RunResult(None, "max_steps", steps, usage)
