"""The vLLM engine (workloads.agents.engine: vllm) on a GPU host: every step a valid action
under vLLM's structured outputs. Skipped without vllm and CUDA (this project's CI machine)."""

import asyncio
import time

import pytest

vllm = pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a GPU")


def test_vllm_steps_are_valid_actions_and_a_late_step_is_dropped(tmp_path):
    from serve_app.agents.calls import Answer, ToolCall, parse_action
    from serve_app.agents.grammar import step_schema_text
    from serve_app.agents.tools import CalculatorArgs
    from serve_app.config import AgentsConfig
    from serve_app.contracts import DeadlinePassed
    from serve_app.engines.vllm_engine import VLLMEngine, VLLMStepRunner

    async def scenario():
        cfg = AgentsConfig(engine="vllm", runtime={"cache_dir": str(tmp_path), "device": "cuda"},
                           placement={"num_gpus": 0.3, "gpu_memory_fraction": 0.3})
        engine = VLLMEngine(cfg, loop=asyncio.get_running_loop())
        runner = VLLMStepRunner(engine, max_rows=8)
        grammar = step_schema_text([("calculator", CalculatorArgs.model_json_schema())], answer_only=False)
        try:
            steps = await asyncio.gather(*(runner.run([{"role": "user", "content": f"what is {i} * 23?"}], grammar)
                                           for i in range(8)))
            with pytest.raises(DeadlinePassed):
                await runner.run([{"role": "user", "content": "x"}], grammar, 4000, deadline=time.time() + 0.001)
            return steps, runner.idle
        finally:
            engine.close()

    steps, idle = asyncio.run(scenario())
    for step in steps:
        action = parse_action(step.text, {"calculator"})
        assert isinstance(action, (Answer, ToolCall))
        if isinstance(action, ToolCall):
            CalculatorArgs.model_validate(action.args)
    assert idle
