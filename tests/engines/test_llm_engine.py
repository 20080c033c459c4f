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
