"""A causal LM for the agent loop: conversations in, the next assistant message out, many
sessions per forward pass, each step decoded under its action grammar. Knows nothing of
Serve or tools.

Continuous batching: the engine keeps one running batch (a left-padded KV cache). `decode`
lets new steps join it (their prompts are prefilled together, then merged into the
batch's cache), drops cancelled ones, and advances every row a token per forward pass; a
row leaves as soon as its action is complete (the grammar says when), so a short action
never waits for a long one. Greedy: the same conversation gives the same message.

Constrained decoding: a step with a grammar (serve_app/agents/grammar.py) samples only
tokens its xgrammar matcher allows. At the step's budget (max_new_tokens) an unfinished
action is closed: the engine prefers the tokens that end it (`"` inside a string, then `}`
or `]`) and otherwise takes what the grammar requires, for at most CLOSE_ALLOWANCE more
tokens; an answer closes in two. Only a row that the grammar cannot close in that many
tokens comes back incomplete, and the agent loop reports it as an invalid step.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from serve_app.config import AgentsConfig
from serve_app.contracts import Generation, StepRequest
from serve_app.engines.base import GeneratingEngine
from serve_app.engines.tiny_lm import TINY_LM_ID, build_tiny_lm
from serve_app.engines.weights import weights_digest
from serve_app.inference.gpu import torch_runtime

log = logging.getLogger("ray.serve.torchrank.llm")

CLOSE_ALLOWANCE = 64  # tokens past the budget for closing an action


def resolve_model_path(model: str, cache_dir: str) -> str:
    if model == TINY_LM_ID:
        return str(build_tiny_lm(Path(cache_dir).expanduser() / "tiny-lm"))
    return model  # a local directory or a hub id: from_pretrained takes both


@dataclass
class _Row:
    key: int
    prompt_tokens: int
    budget: int
    matcher: object = None  # xgrammar GrammarMatcher; None: free text to EOS or the budget
    generated: list = field(default_factory=list)
    in_string: bool = False  # inside a JSON string, for closing
    escaped: bool = False
    done: bool = False

    def track(self, text: bytes) -> None:
        for byte in text:
            if self.escaped:
                self.escaped = False
            elif byte == 0x5C and self.in_string:  # backslash
                self.escaped = True
            elif byte == 0x22:  # quote
                self.in_string = not self.in_string


class _Batch:
    """The rows decoding together and their KV cache: [rows, heads, columns, dim] per layer,
    left-padded, with `mask` [rows, columns] (0 on padding) and each row's next position."""

    def __init__(self, engine: "LLMEngine"):
        self.engine = engine
        self.rows: list[_Row] = []
        self.cache = None
        self.mask = None
        self.positions = None  # [rows]: the position of the token fed next
        self.last = None  # [rows]: the token fed next (each row's latest)

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, steps: list[StepRequest]) -> list[_Row]:
        """Prefill the new steps' prompts in one pass, choose their first tokens, merge them in."""
        engine, torch = self.engine, self.engine.torch
        prompts = [engine.prompt_ids(step.messages) for step in steps]
        rows = [_Row(step.key, len(ids), step.max_new_tokens or engine.max_new_tokens,
                     engine.grammars.matcher(step.grammar) if step.grammar else None)
                for step, ids in zip(steps, prompts)]
        width = max(len(ids) for ids in prompts)
        pad = engine.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts], device=engine.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=engine.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache(config=engine.model.config)
        logits = engine.forward(input_ids, mask, positions, cache)
        last = engine.choose(rows, logits[:, -1, :])
        self._merge(rows, cache, mask, positions[:, -1] + 1, last)
        return rows

    def _merge(self, rows, cache, mask, positions, last) -> None:
        torch = self.engine.torch
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.last = rows, cache, mask, positions, last
            return
        ours, theirs = self.mask.shape[1], mask.shape[1]
        width = max(ours, theirs)
        for mine, new in zip(self.cache.layers, cache.layers):
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(new, name)
                a = torch.nn.functional.pad(a, (0, 0, width - ours, 0))
                b = torch.nn.functional.pad(b, (0, 0, width - theirs, 0))
                setattr(mine, name, torch.cat([a, b], dim=0))
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (width - ours, 0)),
                               torch.nn.functional.pad(mask, (width - theirs, 0))], dim=0)
        self.rows = self.rows + rows
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, last])

    def step(self) -> None:
        """One forward pass: every row advances a token."""
        engine, torch = self.engine, self.engine.torch
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits = engine.forward(self.last[:, None], self.mask, self.positions[:, None], self.cache)
        self.positions = self.positions + 1
        self.last = engine.choose(self.rows, logits[:, -1, :])

    def keep(self, keep: list[int]) -> None:
        """Only the rows at `keep` stay; columns that are padding in every row left go."""
        torch = self.engine.torch
        if not keep:
            self.rows, self.cache, self.mask, self.positions, self.last = [], None, None, None, None
            return
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        start = int(self.mask.any(dim=0).long().argmax())
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def drop_finished(self) -> list[_Row]:
        finished = [row for row in self.rows if row.done]
        if finished:
            self.keep([i for i, row in enumerate(self.rows) if not row.done])
        return finished


class LLMEngine(GeneratingEngine):
    FREES = ("model", "tokenizer", "grammars", "_running")

    def __init__(self, cfg: AgentsConfig, num_threads: int = 1):
        self.torch, self.device, dtype = torch_runtime(cfg.runtime, cfg.placement.memory_cap, num_threads,
                                                       fp16=cfg.runtime.fp16)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from serve_app.agents.grammar import GrammarCache

        path = resolve_model_path(cfg.model.id, cfg.runtime.cache_dir)
        self.model_id = cfg.model.id
        self.memory_cap = cfg.placement.memory_cap if self.device == "cuda" else None
        self.weights_sha256 = weights_digest(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.max_new_tokens = cfg.model.max_new_tokens
        self.vocab_size = self.model.config.get_text_config().vocab_size  # the logits' width
        self.grammars = GrammarCache(self.tokenizer, self.vocab_size)
        vocab = self.grammars.info.decoded_vocab
        self._token_bytes = [bytes(t) for t in vocab]
        self._closers = {text: i for i, text in enumerate(self._token_bytes) if text in (b'"', b"}", b"]")}
        self._running = _Batch(self)
        self.forward_passes = 0
        self.tokens_decoded = 0
        self.mask_s = 0.0  # seconds spent in grammar masks: the price of constrained decoding
        self.model.register_forward_pre_hook(self._count_pass)
        # transformers 5.24 renames `past_key_values` to `cache` (the old name warns until 5.40).
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        log.info("loaded %s on %s (%s)", cfg.model.id, self.device, dtype)
        self.generate([[{"role": "user", "content": "warm up"}]], max_new_tokens=2)

    def _count_pass(self, *_):
        self.forward_passes += 1

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def forward(self, input_ids, mask, positions, cache):
        with self.torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{self._cache_arg: cache})
        return out.logits

    def choose(self, rows: list[_Row], logits):
        """Each row's next token (greedy, under its grammar), accepted and recorded; [rows]."""
        torch = self.torch
        logits = logits.float()
        constrained = [i for i, row in enumerate(rows) if row.matcher is not None]
        bitmask = None
        if constrained:
            started = time.perf_counter()
            xgr = self.grammars.xgr
            bitmask = self.grammars.allocate_bitmask(len(rows))
            for i in constrained:
                rows[i].matcher.fill_next_token_bitmask(bitmask, i)
            xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size,
                                            indices=constrained)
            self.mask_s += time.perf_counter() - started
        chosen = logits.argmax(dim=-1)
        tokens = chosen.tolist()
        eos = self.tokenizer.eos_token_id
        for i, row in enumerate(rows):
            token = tokens[i]
            if row.matcher is not None:
                if len(row.generated) >= row.budget:
                    token = self._closing_token(row, bitmask[i], token)
                    tokens[i] = token
                started = time.perf_counter()
                accepted = row.matcher.accept_token(token)
                self.mask_s += time.perf_counter() - started
                row.generated.append(token)
                row.track(self._token_bytes[token])
                row.done = (not accepted or row.matcher.is_completed()
                            or len(row.generated) >= row.budget + CLOSE_ALLOWANCE)
            else:
                if token == eos:
                    row.done = True
                else:
                    row.generated.append(token)
                    row.done = len(row.generated) >= row.budget
        self.tokens_decoded += len(rows)
        return torch.tensor(tokens, device=chosen.device)

    def _closing_token(self, row: _Row, allowed, fallback: int) -> int:
        """The token that ends the action soonest: the string's quote, then a closing brace
        or bracket; otherwise the grammar's own choice (`fallback`, already masked)."""
        preference = (b'"', b"}", b"]") if row.in_string else (b"}", b"]")
        for text in preference:
            token = self._closers.get(text)
            if token is not None and (int(allowed[token // 32]) >> (token % 32)) & 1:
                return token
        return fallback

    def _finish(self, row: _Row) -> Generation:
        return Generation(self.tokenizer.decode(row.generated, skip_special_tokens=True), row.prompt_tokens,
                          len(row.generated))

    def decode(self, joins: list[StepRequest], cancels: list[int], max_iterations: int) -> dict:
        """Advance the running batch: drop the `cancels` (keys), add the `joins`, then decode
        up to `max_iterations` tokens, returning as soon as a row has finished. ->
        {"finished": [(key, its message)], "tokens": decoded, "passes": forward passes}.
        The batch stays for the next call; after an error it is dropped whole."""
        batch, tokens, passes = self._running, self.tokens_decoded, self.forward_passes
        try:
            if cancels and batch.rows:
                gone = set(cancels)
                batch.keep([i for i, row in enumerate(batch.rows) if row.key not in gone])
            if joins:
                batch.join(joins)
            finished = batch.drop_finished()
            for _ in range(max_iterations):
                if finished or not batch.rows:
                    break
                batch.step()
                finished = batch.drop_finished()
        except BaseException:
            self._running = _Batch(self)
            raise
        return {"finished": [(row.key, self._finish(row)) for row in finished],
                "tokens": self.tokens_decoded - tokens, "passes": self.forward_passes - passes}

    def running(self) -> int:
        """Rows in the running batch."""
        return len(self._running)

    def generate(self, conversations: list[list[dict]], max_new_tokens: int | None = None,
                 grammars: Optional[list[Optional[str]]] = None) -> list[Generation]:
        """The next message of each conversation, decoded together in one batch of their own
        (outside the running batch): one pass for the prompts, then one per token."""
        grammars = grammars or [None] * len(conversations)
        batch = _Batch(self)
        rows = batch.join([StepRequest(i, messages, grammar, max_new_tokens)
                           for i, (messages, grammar) in enumerate(zip(conversations, grammars))])
        batch.drop_finished()
        while batch.rows:
            batch.step()
            batch.drop_finished()
        return [self._finish(row) for row in rows]

    def probe(self) -> None:
        """A real one-token call: the health check."""
        self.generate([[{"role": "user", "content": "health"}]], max_new_tokens=1)

    def info(self) -> dict:
        return {"model": self.model_id, "weights_sha256": self.weights_sha256, "device": self.device,
                "gpu_memory_fraction": self.memory_cap, "engine": "transformers", "constrained_decoding": "xgrammar",
                "dtype": str(self.model.dtype).removeprefix("torch."), "max_new_tokens": self.max_new_tokens}
