"""The grammar of one model step: the JSON schema every action must match, compiled for the
model's tokenizer with xgrammar and cached per tool set.

A step's action is one JSON object, in the format the system prompt shows
(serve_app/agents/calls.py):

    {"tool": "<an offered tool>", "args": <that tool's pydantic args schema>}
    {"answer": "<text>"}

On the run's last allowed step only the second form is allowed, so a run always ends
with an answer. Whitespace is fixed (", " and ": ", no newlines), so every string is
bounded and no path through the grammar is unbounded: with the engine's closing of an
action at its token budget (serve_app/engines/llm.py), every step the model takes is a
valid action.

Why xgrammar (benchmarks/README.md, "Issue 21: structured-generation libraries"): on this
CPU it compiles the tool set's schema in milliseconds, fills a step's token mask in
microseconds, keeps `maxLength` and `pattern` exact, and is what vLLM uses by default, so
the transformers and vLLM engines decode under the same grammar.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from typing import Iterable

MAX_ANSWER_CHARS = 4000  # the answer string: what a validator reads, not an essay
SEPARATORS = (", ", ": ")  # as in the system prompt's examples


def _without_titles(schema: dict) -> dict:
    """Pydantic's schema without `title`, `description` and `default`: they do not constrain,
    and a shorter schema compiles faster."""
    schema = copy.deepcopy(schema)

    def strip(node):
        if isinstance(node, dict):
            for key in ("title", "description", "default"):
                node.pop(key, None)
            for value in node.values():
                strip(value)
        elif isinstance(node, list):
            for value in node:
                strip(value)

    strip(schema)
    return schema


def answer_schema(max_answer_chars: int = MAX_ANSWER_CHARS) -> dict:
    # Not empty: an empty answer scores as a wrong one.
    return {"type": "object", "properties": {"answer": {"type": "string", "minLength": 1,
                                                        "maxLength": max_answer_chars}},
            "required": ["answer"], "additionalProperties": False}


def tool_call_schema(name: str, args_schema: dict) -> dict:
    return {"type": "object", "properties": {"tool": {"const": name}, "args": _without_titles(args_schema)},
            "required": ["tool", "args"], "additionalProperties": False}


def action_schema(tools: Iterable[tuple[str, dict]], answer_only: bool = False,
                  max_answer_chars: int = MAX_ANSWER_CHARS) -> dict:
    """The schema of one step's action. `tools`: (name, args JSON schema) of the offered tools."""
    answer = answer_schema(max_answer_chars)
    if answer_only:
        return answer
    variants = [tool_call_schema(name, schema) for name, schema in tools]
    return {"anyOf": [*variants, answer]} if variants else answer


def step_schema_text(tools: Iterable[tuple[str, dict]], answer_only: bool) -> str:
    """The schema as text: the grammar cache's key and what crosses to the engine. Keys keep
    their order (not sorted): a grammar's properties come in the order the schema lists them,
    "tool" before "args" as in the system prompt."""
    return json.dumps(action_schema(tools, answer_only), separators=(",", ":"))


class GrammarCache:
    """Compiled grammars for one tokenizer, by schema text; the least recently used go first.
    A tool set's two grammars (any action, answer only) compile once per replica."""

    def __init__(self, tokenizer, vocab_size: int, max_entries: int = 64):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.max_entries = max_entries
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self.compiles = 0
        self.compile_s = 0.0

    def matcher(self, schema_text: str):
        """A fresh matcher for one step under `schema_text`."""
        import time

        compiled = self._compiled.get(schema_text)
        if compiled is None:
            started = time.perf_counter()
            compiled = self.compiler.compile_json_schema(schema_text, any_whitespace=False, separators=SEPARATORS,
                                                         strict_mode=True)
            self.compile_s += time.perf_counter() - started
            self.compiles += 1
            self._compiled[schema_text] = compiled
            if len(self._compiled) > self.max_entries:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(schema_text)
        return self.xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)

    def allocate_bitmask(self, rows: int):
        return self.xgr.allocate_token_bitmask(rows, self.info.vocab_size)
