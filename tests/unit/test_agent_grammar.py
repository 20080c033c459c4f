"""The action grammar: its schema, and xgrammar's matcher on the tiny LM's tokenizer taking
exactly the valid actions of the offered tools."""

import json

import pytest

from serve_app.agents.grammar import GrammarCache, action_schema, step_schema_text
from serve_app.agents.tools import CalculatorArgs, RetrieveArgs, ScratchpadArgs

TOOLS = [("calculator", CalculatorArgs.model_json_schema()), ("scratchpad", ScratchpadArgs.model_json_schema()),
         ("retrieve", RetrieveArgs.model_json_schema())]


@pytest.fixture(scope="module")
def grammars():
    from serve_app.engines.tiny_lm import build_tokenizer

    tokenizer = build_tokenizer()
    return tokenizer, GrammarCache(tokenizer, len(tokenizer))


def accepts(grammars, schema: str, text: str) -> bool:
    tokenizer, cache = grammars
    matcher = cache.matcher(schema)
    return all(matcher.accept_token(t) for t in tokenizer.encode(text, add_special_tokens=False)) and \
        matcher.is_completed()


def test_the_schema_offers_each_tool_with_its_args_or_an_answer():
    schema = action_schema(TOOLS)
    tools = [v["properties"]["tool"]["const"] for v in schema["anyOf"] if "tool" in v["properties"]]
    assert tools == ["calculator", "scratchpad", "retrieve"]
    calc = schema["anyOf"][0]["properties"]["args"]
    assert calc["additionalProperties"] is False and calc["required"] == ["expression"]
    assert "title" not in json.dumps(schema)  # stripped: they constrain nothing
    assert action_schema(TOOLS, answer_only=True) == schema["anyOf"][-1]
    assert action_schema(TOOLS, answer_only=True)["properties"]["answer"]["minLength"] == 1


@pytest.mark.parametrize("text, valid", [
    ('{"tool": "calculator", "args": {"expression": "17 * 23"}}', True),
    ('{"tool": "retrieve", "args": {"query": "paris", "top_k": 3}}', True),
    ('{"tool": "scratchpad", "args": {"op": "set", "key": "x", "value": "1"}}', True),
    ('{"answer": "391"}', True),
    ('{"answer": ""}', False),  # an empty answer scores as a wrong one
    ('{"tool": "http_fetch", "args": {"url": "http://x"}}', False),  # not offered
    ('{"tool": "calculator", "args": {"expr": "1"}}', False),  # not its args
    ('{"tool": "retrieve", "args": {"query": "x", "top_k": 99}}', False),  # over le=20
    ('{"tool": "scratchpad", "args": {"op": "drop"}}', False),  # the op's pattern
    ('{"tool":"calculator","args":{"expression":"1"}}', False),  # the fixed separators only
    ('I think {"answer": "4"}', False),
])
def test_the_matcher_takes_exactly_the_valid_actions(grammars, text, valid):
    assert accepts(grammars, step_schema_text(TOOLS, answer_only=False), text) is valid


def test_the_last_step_takes_only_an_answer(grammars):
    schema = step_schema_text(TOOLS, answer_only=True)
    assert accepts(grammars, schema, '{"answer": "391"}')
    assert not accepts(grammars, schema, '{"tool": "calculator", "args": {"expression": "1"}}')


def test_a_tool_set_compiles_once(grammars):
    _, cache = grammars
    schema = step_schema_text(TOOLS[:1], answer_only=False)
    before = cache.compiles
    for _ in range(3):
        cache.matcher(schema)
    assert cache.compiles == before + 1 and cache.compile_s > 0
