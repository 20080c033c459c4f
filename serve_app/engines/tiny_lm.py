"""A tiny chat causal LM built from configs, for machines with no model hub.

A 2-layer Llama with fixed random weights (seeded) and a byte-level BPE tokenizer with no
merges (one token per byte) plus ChatML-style special tokens and a chat template. Saved
with `save_pretrained` and loaded back through `AutoModelForCausalLM` / `AutoTokenizer`,
the path a hub model takes. Its text is noise, but deterministic: enough for the
embedded default, tests of generation and batching, and benchmarks.
"""

from __future__ import annotations

from pathlib import Path

from serve_app.engines.weights import build_once

TINY_LM_ID = "torchrank/tiny-lm"
SEED = 4321
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", bos_token="<|bos|>",
                                        eos_token="<|im_end|>", additional_special_tokens=SPECIALS[2:4],
                                        model_max_length=2048)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_lm(path: str | Path) -> Path:
    """Build and save model and tokenizer under `path` (idempotent: an existing build is kept)."""
    return build_once(Path(path), "config.json", _write)


def _write(directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
