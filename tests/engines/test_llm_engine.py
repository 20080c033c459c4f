"""The tiny chat LM, built from configs and loaded through from_pretrained, and the batched engine."""

import pytest

from serve_app.config import AgentsConfig
from serve_app.engines.llm import LLMEngine
from serve_app.engines.tiny_lm import build_tiny_lm


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = LLMEngine(AgentsConfig(runtime={"cache_dir": str(tmp_path_factory.mktemp("models")), "device": "cpu"},
                                    model={"max_new_tokens": 8}))
    yield engine
    engine.close()  # the model's memory and threads go before the next module's tests


def test_build_is_idempotent_and_deterministic(tmp_path, engine):
    first = build_tiny_lm(tmp_path / "a")
    assert build_tiny_lm(first) == first
    from serve_app.engines.weights import weights_digest

    assert weights_digest(str(first)) == engine.weights_sha256 == weights_digest(str(build_tiny_lm(tmp_path / "b")))


def test_chat_template_and_byte_tokenizer_round_trip(engine):
    text = "tools: calculator, émoji ✓"
    assert engine.tokenizer.decode(engine.tokenizer(text)["input_ids"]) == text
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                  tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_sessions_share_forward_passes(engine):
    conversations = [[{"role": "user", "content": f"task number {i} " * (i + 1)}] for i in range(6)]
    before = engine.forward_passes
    results = engine.generate(conversations, max_new_tokens=5)
    # One pass for the prompts, then one per new token: for all six sessions together.
    assert engine.forward_passes - before <= 5
    assert len(results) == 6 and all(r.completion_tokens <= 5 for r in results)
    assert [r.prompt_tokens for r in results] == [len(engine.prompt_ids(c)) for c in conversations]


def test_greedy_generation_is_repeatable(engine):
    conversation = [[{"role": "user", "content": "the same task"}]]
    assert engine.generate(conversation) == engine.generate(conversation)


def test_probe_is_one_real_token_and_info_is_a_method(engine):
    before = engine.forward_passes
    engine.probe()
    assert engine.forward_passes - before == 1
    assert engine.info()["model"] == engine.model_id and engine.info()["device"] == "cpu"


# Constrained decoding and continuous batching (issue 21).
from serve_app.agents.calls import Answer, ToolCall, parse_action  # noqa: E402
from serve_app.agents.grammar import step_schema_text  # noqa: E402
from serve_app.agents.tools import CalculatorArgs, RetrieveArgs, ScratchpadArgs  # noqa: E402
from serve_app.contracts import StepRequest  # noqa: E402

ARGS = {"calculator": CalculatorArgs, "scratchpad": ScratchpadArgs, "retrieve": RetrieveArgs}


def grammar(names, answer_only=False):
    return step_schema_text([(n, ARGS[n].model_json_schema()) for n in names], answer_only)


def task(i):
    return [{"role": "user", "content": f"what is {i} * 23? " * (1 + i % 3)}]


@pytest.mark.parametrize("names", [["calculator"], ["scratchpad"], ["retrieve"], ["calculator", "scratchpad",
                                                                                    "retrieve"], []])
def test_every_constrained_step_is_a_valid_action(engine, names):
    # The random-weight model's free text is noise; under the grammar each step is a call of an
    # offered tool whose args its pydantic model accepts, or a non-empty answer.
    for generation in engine.generate([task(i) for i in range(4)], max_new_tokens=40,
                                      grammars=[grammar(names)] * 4):
        action = parse_action(generation.text, set(names))
        if isinstance(action, ToolCall):
            ARGS[action.tool].model_validate(action.args)
        else:
            assert isinstance(action, Answer) and action.text


@pytest.mark.parametrize("budget", [1, 3, 12])
def test_an_action_cut_at_its_budget_is_closed(engine, budget):
    answer, = engine.generate([task(1)], max_new_tokens=budget, grammars=[grammar(["calculator"], answer_only=True)])
    action = parse_action(answer.text, {"calculator"})
    assert isinstance(action, Answer) and action.text and answer.completion_tokens <= budget + 16
    call, = engine.generate([task(2)], max_new_tokens=budget, grammars=[grammar(["calculator"])])
    assert parse_action(call.text, {"calculator"})  # a valid call or answer, closed past the budget


def test_steps_joining_and_leaving_a_running_batch_decode_as_alone(engine):
    g = grammar(["calculator", "scratchpad"])
    alone = [engine.generate([task(i)], max_new_tokens=30 + 10 * i, grammars=[g])[0] for i in range(4)]
    steps = [StepRequest(i, task(i), g, 30 + 10 * i) for i in range(4)]
    finished = {}
    finished.update(engine.decode(steps[:1], [], 5)["finished"])
    finished.update(engine.decode(steps[1:3], [], 7)["finished"])  # join a batch three tokens... in
    finished.update(engine.decode(steps[3:], [], 2)["finished"])
    calls = 3
    while engine.running():
        finished.update(engine.decode([], [], 64)["finished"])
        calls += 1
    assert [finished[i] for i in range(4)] == alone
    assert calls > 4  # rows left one by one, not all at the end


def test_a_cancelled_step_leaves_the_batch_and_the_others_go_on(engine):
    g = grammar(["calculator"], answer_only=True)
    alone = engine.generate([task(5)], max_new_tokens=20, grammars=[g])[0]
    out = engine.decode([StepRequest(1, task(4), g, 200), StepRequest(2, task(5), g, 20)], [], 2)
    assert engine.running() == 2 and not out["finished"] and out["tokens"] == 6  # a first token each at the prefill, then two passes
    engine.decode([], [1], 0)
    assert engine.running() == 1
    finished = {}
    while engine.running():
        finished.update(engine.decode([], [], 64)["finished"])
    assert finished == {2: alone}


def test_an_engine_error_drops_the_batch(engine):
    g = grammar(["calculator"])
    engine.decode([StepRequest(1, task(1), g, 50)], [], 1)
    with pytest.raises(Exception):
        engine.decode([StepRequest(2, [{"role": "user", "content": "x"}], "{not a schema", None)], [], 1)
    assert engine.running() == 0
    assert engine.decode([StepRequest(3, task(1), g, 50)], [], 0)["finished"] == []  # and it serves on
    engine.decode([], [3], 0)
