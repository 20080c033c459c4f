"""The agent's action format, parsed from the model's message.

Each assistant message holds one JSON object, alone or inside other text (code fences,
a sentence before it):

    {"tool": "<name>", "args": {...}}     call a tool; its result comes back as the next message
    {"answer": "<text>"}                  finish with this answer

Anything else is an InvalidAction whose message goes back to the model as the tool
result, so it can correct itself; it never ends the run by itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Union

MAX_ACTION_CHARS = 16_384


class InvalidAction(ValueError):
    """The message is not a valid action; str(exc) is what the model is told."""


@dataclass(frozen=True)
class ToolCall:
    tool: str
    args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Answer:
    text: str


Action = Union[ToolCall, Answer]


def first_json_object(text: str) -> dict:
    # strict=False: a raw control character (a tab) inside a string is taken as it is. The action
    # grammar allows them, as models write them; the answer goes out re-encoded, escaped.
    decoder = json.JSONDecoder(strict=False)
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    raise InvalidAction('no JSON object found; reply with {"tool": name, "args": {...}} or {"answer": text}')


def parse_action(text: str, allowed_tools: set[str]) -> Action:
    if len(text) > MAX_ACTION_CHARS:
        raise InvalidAction(f"the message is longer than {MAX_ACTION_CHARS} characters")
    obj = first_json_object(text)
    if "answer" in obj:
        if not isinstance(obj["answer"], str):
            raise InvalidAction('"answer" must be a string')
        return Answer(obj["answer"])
    tool, args = obj.get("tool"), obj.get("args", {})
    if not isinstance(tool, str):
        raise InvalidAction('expected "tool" (a string) or "answer"')
    if tool not in allowed_tools:
        raise InvalidAction(f"tool {tool!r} is not available; available: {sorted(allowed_tools)}")
    if not isinstance(args, dict):
        raise InvalidAction('"args" must be a JSON object')
    return ToolCall(tool, args)
