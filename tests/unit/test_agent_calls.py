import pytest

from serve_app.agents.calls import Answer, InvalidAction, ToolCall, parse_action

TOOLS = {"calculator", "scratchpad"}


@pytest.mark.parametrize("text, action", [
    ('{"tool": "calculator", "args": {"expression": "1+1"}}', ToolCall("calculator", {"expression": "1+1"})),
    ('I will compute.\n```json\n{"tool": "calculator", "args": {"expression": "2"}}\n```', ToolCall("calculator", {"expression": "2"})),
    ('{"tool": "scratchpad"}', ToolCall("scratchpad", {})),
    ('{"answer": "42"}', Answer("42")),
    ('{not json} then {"answer": "ok"}', Answer("ok")),
])
def test_actions(text, action):
    assert parse_action(text, TOOLS) == action


@pytest.mark.parametrize("text, why", [
    ("no braces at all", "no JSON object"),
    ("{broken", "no JSON object"),
    ('{"tool": "shell", "args": {}}', "'shell' is not available"),
    ('{"tool": 3}', 'expected "tool"'),
    ('{"tool": "calculator", "args": [1]}', '"args" must be'),
    ('{"answer": 42}', '"answer" must be a string'),
    ("{" * 20000, "longer than"),
])
def test_invalid_actions_say_why(text, why):
    with pytest.raises(InvalidAction, match=why):
        parse_action(text, TOOLS)


def test_a_raw_control_character_in_a_string_is_taken_as_written():
    # The action grammar (like JSON-mode decoders generally) lets a model write a raw tab or other
    # control character inside a string; strict JSON would refuse the whole action.
    assert parse_action('{"answer": "a\tb\x01c"}', set()).text == "a\tb\x01c"
    assert parse_action('{"tool": "calculator", "args": {"expression": "1\t+ 1"}}', {"calculator"}).args == {
        "expression": "1\t+ 1"}
