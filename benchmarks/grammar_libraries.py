"""Structured-generation libraries on this CPU: xgrammar, llguidance, outlines-core (issue 21).

    .venv/bin/pip install xgrammar==0.2.9 llguidance==1.9.1 outlines-core==0.2.14
    .venv/bin/python benchmarks/grammar_libraries.py

The grammar is the agent step's (serve_app/agents/grammar.py): any of the four built-in
tools' calls or an answer. Two tokenizers: the tiny LM's (261 byte tokens) and a
byte-level BPE of 32,000 tokens trained here on Python's own sources (a hub tokenizer's
size; the hubs are unreachable). Per library and tokenizer:
  - prepare: the tokenizer's vocabulary turned into the library's form (once per replica);
  - compile: the step grammar (once per tool set; xgrammar and llguidance also build
    lazily at the first masks, so "first mask" is reported too);
  - mask: filling one row's token mask and accepting the token, per decoded token, over
    three real actions (mean of the tokens of all three, after one warm pass).
Only xgrammar is a dependency of the miner; the other two are installed by hand to rerun
this. Results go to benchmarks/results/grammar_libraries.json.
"""

from __future__ import annotations

import json
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serve_app.agents.grammar import SEPARATORS, step_schema_text  # noqa: E402
from serve_app.agents.tools import CalculatorArgs, FetchArgs, RetrieveArgs, ScratchpadArgs  # noqa: E402

TOOLS = [("calculator", CalculatorArgs), ("scratchpad", ScratchpadArgs), ("retrieve", RetrieveArgs),
         ("http_fetch", FetchArgs)]
ACTIONS = ['{"tool": "calculator", "args": {"expression": "17 * 23 + sqrt(2)"}}',
           '{"tool": "retrieve", "args": {"query": "the capital of France", "top_k": 3}}',
           '{"answer": "The product is 391, and the capital of France is Paris."}']
COMPILE_LIMIT_S = 120.0  # outlines-core's regex index may not finish: reported as such


def tokenizers():
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from serve_app.engines.tiny_lm import build_tiny_lm

    tiny = AutoTokenizer.from_pretrained(str(build_tiny_lm(Path(tempfile.mkdtemp()) / "tiny-lm")))
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:1500]
    texts = (p.read_bytes().decode("utf-8", "replace") for p in sources)
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer)
    bpe = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")
    return {"tiny-lm (261)": tiny, f"byte-level BPE ({len(bpe)})": bpe}


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def run_xgrammar(tok, schema: str) -> dict:
    import xgrammar as xgr

    info, prepare = timed(lambda: xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok)))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    grammar, compile_s = timed(lambda: compiler.compile_json_schema(schema, any_whitespace=False,
                                                                    separators=SEPARATORS))
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)

    def decode(ids):
        matcher = xgr.GrammarMatcher(grammar, terminate_without_stop_token=True)
        for token in ids:
            matcher.fill_next_token_bitmask(bitmask)
            assert matcher.accept_token(token)
        assert matcher.is_completed()

    return {"prepare_s": prepare, "compile_s": compile_s, "decode": decode}


def run_llguidance(tok, schema: str) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok, prepare = timed(lambda: llguidance.hf.from_tokenizer(tok))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults={"whitespace_flexible": False, "item_separator": SEPARATORS[0],
                          "key_separator": SEPARATORS[1]})
    _, compile_s = timed(lambda: llguidance.LLMatcher(lltok, grammar))
    bitmask = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)

    def decode(ids):
        matcher = llguidance.LLMatcher(lltok, grammar)
        for token in ids:
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            assert matcher.consume_token(token), matcher.get_error()
        assert matcher.is_accepting()

    return {"prepare_s": prepare, "compile_s": compile_s, "decode": decode}


def run_outlines_core(tok, schema: str) -> dict:
    import multiprocessing

    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    def vocabulary():
        tokens: dict[str, list[int]] = {}
        for text, token_id in tok.get_vocab().items():
            if token_id != tok.eos_token_id:
                tokens.setdefault(tok.convert_tokens_to_string([text]), []).append(token_id)
        return outlines_core.Vocabulary(tok.eos_token_id, tokens)

    vocab, prepare = timed(vocabulary)
    regex = build_regex_from_schema(schema, whitespace_pattern=r"[ ]?")
    # The index is built in a child process, so a build that does not end can be stopped.
    with multiprocessing.get_context("fork").Pool(1) as pool:
        pending = pool.apply_async(_outlines_index_seconds, (regex, vocab))
        try:
            compile_s = pending.get(COMPILE_LIMIT_S)
        except multiprocessing.TimeoutError:
            return {"prepare_s": prepare, "compile_s": None, "note": f"index not built in {COMPILE_LIMIT_S:g} s"}
    index = outlines_core.Index(regex, vocab)

    def decode(ids):
        guide = outlines_core.Guide(index)
        for token in ids:
            allowed = guide.get_tokens()
            assert token in allowed
            guide.advance(token)
        assert guide.is_finished()

    return {"prepare_s": prepare, "compile_s": compile_s, "decode": decode}


def _outlines_index_seconds(regex, vocab) -> float:
    import outlines_core

    return timed(lambda: outlines_core.Index(regex, vocab))[1]


def main() -> None:
    schema = step_schema_text([(name, args.model_json_schema()) for name, args in TOOLS], answer_only=False)
    results = {}
    for tok_name, tok in tokenizers().items():
        traces = [tok.encode(action, add_special_tokens=False) for action in ACTIONS]
        tokens = sum(len(ids) for ids in traces)
        for lib, run in (("xgrammar", run_xgrammar), ("llguidance", run_llguidance),
                         ("outlines-core", run_outlines_core)):
            row = run(tok, schema)
            decode = row.pop("decode", None)
            if decode is not None:
                _, first = timed(lambda: decode(traces[0]))  # lazy construction lands here
                _, seconds = timed(lambda: [decode(ids) for ids in traces])
                row.update(first_action_s=first, mask_us_per_token=seconds / tokens * 1e6)
            row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
            results.setdefault(tok_name, {})[lib] = row
            print(f"{tok_name:28s} {lib:14s} {json.dumps(row)}", flush=True)
    out = ROOT / "benchmarks/results/grammar_libraries.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
