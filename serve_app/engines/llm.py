"""A causal LM for the agent loop: chat template in, generated text out, many sessions per
forward pass. Knows nothing of Serve or tools.

`generate` takes the conversations of several sessions at once, left-pads them into one
batch and decodes them together (greedy: the same conversation gives the same answer),
so one forward pass advances every session in the batch by a token.
"""

from __future__ import annotations

import logging
from pathlib import Path

from serve_app.config import AgentsConfig
from serve_app.contracts import Generation
from serve_app.engines.base import GeneratingEngine
from serve_app.engines.tiny_lm import TINY_LM_ID, build_tiny_lm
from serve_app.engines.weights import weights_digest
from serve_app.inference.gpu import torch_runtime

log = logging.getLogger("ray.serve.torchrank.llm")


def resolve_model_path(model: str, cache_dir: str) -> str:
    if model == TINY_LM_ID:
        return str(build_tiny_lm(Path(cache_dir).expanduser() / "tiny-lm"))
    return model  # a local directory or a hub id: from_pretrained takes both


class LLMEngine(GeneratingEngine):
    FREES = ("model", "tokenizer")

    def __init__(self, cfg: AgentsConfig, num_threads: int = 1):
        self.torch, self.device, dtype = torch_runtime(cfg.runtime, cfg.placement.memory_cap, num_threads,
                                                       fp16=cfg.runtime.fp16)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model_path(cfg.model.id, cfg.runtime.cache_dir)
        self.model_id = cfg.model.id
        self.memory_cap = cfg.placement.memory_cap if self.device == "cuda" else None
        self.weights_sha256 = weights_digest(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # generation continues every row from its last real token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.max_new_tokens = cfg.model.max_new_tokens
        self.forward_passes = 0
        self.model.register_forward_pre_hook(self._count_pass)
        log.info("loaded %s on %s (%s)", cfg.model.id, self.device, dtype)
        self.generate([[{"role": "user", "content": "warm up"}]], max_new_tokens=2)

    def _count_pass(self, *_):
        self.forward_passes += 1

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def generate(self, conversations: list[list[dict]], max_new_tokens: int | None = None) -> list[Generation]:
        """The next assistant message of each conversation, decoded together in one batch."""
        limit = max_new_tokens or self.max_new_tokens
        prompts = [self.prompt_ids(messages) for messages in conversations]
        batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=limit, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id)
        width = batch["input_ids"].shape[1]
        results = []
        for prompt, row in zip(prompts, out[:, width:].tolist()):
            if self.tokenizer.eos_token_id in row:
                row = row[: row.index(self.tokenizer.eos_token_id)]
            row = [t for t in row if t != self.tokenizer.pad_token_id]
            results.append(Generation(self.tokenizer.decode(row, skip_special_tokens=True), len(prompt), len(row)))
        return results

    def probe(self) -> None:
        """A real one-token call: the health check."""
        self.generate([[{"role": "user", "content": "health"}]], max_new_tokens=1)

    def info(self) -> dict:
        return {"model": self.model_id, "weights_sha256": self.weights_sha256, "device": self.device,
                "gpu_memory_fraction": self.memory_cap,
                "dtype": str(self.model.dtype).removeprefix("torch."), "max_new_tokens": self.max_new_tokens}
