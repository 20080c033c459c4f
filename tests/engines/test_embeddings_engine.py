"""The embeddings engine on the real all-MiniLM-L6-v2 weights, without Serve."""

import numpy as np
import pytest

from serve_app.config import EmbeddingsConfig
from serve_app.engines.embeddings import SentenceEmbeddingEngine

TEXTS = [
    "a short one",
    "validators score miners on accuracy, reliability and latency, so the miner answers inside the deadline",
    "stake",
    "the router authenticates every request with a hotkey signature before any model sees it " * 3,
    "embeddings are batched across concurrent requests",
]


@pytest.fixture(scope="module")
def engine():
    engine = SentenceEmbeddingEngine(EmbeddingsConfig(runtime={"offline": True, "device": "cpu", "backend": "torch",
                                                               "precision": "fp32"}), num_threads=1)
    yield engine
    engine.close()  # the model's memory and threads go before the next module's tests


def test_chunks_stay_under_the_padded_token_budget(engine, monkeypatch):
    monkeypatch.setattr(engine, "chunk_tokens", 40)
    features = engine._tokenize(TEXTS)
    lengths = features["attention_mask"].sum(dim=1)
    order = np.argsort(-lengths.numpy(), kind="stable")
    chunks = list(engine._chunks(order, lengths))
    assert sorted(int(i) for chunk in chunks for i in chunk) == list(range(len(TEXTS)))
    for chunk in chunks:
        widest = max(int(lengths[i]) for i in chunk)
        assert len(chunk) == 1 or len(chunk) * widest <= 40


def test_chunking_does_not_change_the_vectors(engine, monkeypatch):
    monkeypatch.setattr(engine, "chunk_tokens", 16384)
    whole, whole_tokens = engine.encode(TEXTS)
    monkeypatch.setattr(engine, "chunk_tokens", 16)  # every text its own chunk
    chunked, chunked_tokens = engine.encode(TEXTS)
    cosine = (whole * chunked).sum(axis=1)
    assert cosine.min() >= 0.99999
    assert np.array_equal(whole_tokens, chunked_tokens)
    assert np.allclose(np.linalg.norm(chunked, axis=1), 1.0, atol=1e-5)


def test_cpu_default_chunk_is_small(engine):
    assert engine.chunk_tokens == 512


def test_token_cap_equals_a_shorter_max_seq_length(engine, monkeypatch):
    """The degraded preset cuts only the capped texts, exactly as the tokenizer would."""
    caps = [None, 16, 16, 16, None]
    capped, tokens = engine.encode(TEXTS, caps)
    full, full_tokens = engine.encode(TEXTS)
    monkeypatch.setattr(engine.model, "max_seq_length", 16)
    short, short_tokens = engine.encode(TEXTS)
    for i, cap in enumerate(caps):
        reference, ref_tokens = (full, full_tokens) if cap is None else (short, short_tokens)
        assert float(capped[i] @ reference[i]) >= 0.99999, i
        assert tokens[i] == ref_tokens[i]
    assert tokens[1] == 16 and full_tokens[1] > 16
    assert tokens[2] == full_tokens[2]  # already short: untouched
