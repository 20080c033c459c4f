"""The embeddings engine on each runtime (torch, ONNX Runtime, OpenVINO; fp32 and bf16), on the
real all-MiniLM-L6-v2 weights: parity with fp32 torch, batch invariance, the conversion
cache, the start-up accuracy check and `auto`'s fallbacks. Each engine is built once per
module, converting into one temporary cache_dir."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serve_app.config import EmbeddingsConfig
from serve_app.engines import embedding_runtimes as runtimes
from serve_app.engines.embeddings import SentenceEmbeddingEngine

BF16 = runtimes.cpu_supports_bf16()
needs_bf16 = pytest.mark.skipif(not BF16, reason="the CPU has no avx512_bf16 / amx_bf16")
RUNTIMES = [
    pytest.param("torch", "fp32", id="torch-fp32"),
    pytest.param("torch", "bf16", id="torch-bf16", marks=needs_bf16),
    pytest.param("onnxruntime", "fp32", id="onnxruntime-fp32"),
    pytest.param("openvino", "fp32", id="openvino-fp32"),
    pytest.param("openvino", "bf16", id="openvino-bf16", marks=needs_bf16),
]
# What each precision promises, to fp32 torch and between a text alone and inside a padded
# batch (README "Embeddings runtimes"): fp32 runtimes measured >= 0.9999999 here, bf16 ~0.99999.
BOUND = {"fp32": 0.99999, "bf16": 0.9999}

TEXTS = [
    "a short one",
    "validators score miners on accuracy, reliability and latency, so the miner answers inside the deadline",
    "stake",
    "the router authenticates every request with a hotkey signature before any model sees it " * 3,
    "embeddings are batched across concurrent requests",
    "Le modèle répond en moins de dix millisecondes ; 42 % des requêtes sont courtes.",
    "x " * 300,
]
CAPS = [None, 16, None, 24, 8, None, 32]


def config(backend, precision, cache_dir, **runtime):
    return EmbeddingsConfig(runtime={"offline": True, "device": "cpu", "backend": backend, "precision": precision,
                                     "cache_dir": str(cache_dir), **runtime})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("converted")


@pytest.fixture(scope="module")
def engines(cache_dir):
    built = {}

    def get(runtime, precision):
        if (runtime, precision) not in built:
            built[runtime, precision] = SentenceEmbeddingEngine(config(runtime, precision, cache_dir), num_threads=2)
        return built[runtime, precision]

    yield get
    for engine in built.values():
        engine.close()  # the models' memory and runtime threads go before the next module's tests


@pytest.fixture(scope="module")
def reference(engines):
    engine = engines("torch", "fp32")
    return engine.encode(TEXTS), engine.encode(TEXTS, CAPS)


def cosines(a, b):
    return np.sum(a.astype(np.float64) * b.astype(np.float64), axis=1)


@pytest.mark.parametrize("runtime, precision", RUNTIMES)
def test_parity_with_fp32_torch(engines, reference, runtime, precision):
    engine = engines(runtime, precision)
    info = engine.info()
    assert (info["runtime"], info["precision"]) == (runtime, precision)
    assert info["min_cosine_measured"] >= info["min_cosine"] == 0.9999
    assert {"torch", "sentence-transformers"} <= set(info["libraries"])
    if runtime != "torch":
        assert {runtime, "onnx"} <= set(info["libraries"])
    for caps, (want, want_tokens) in ((None, reference[0]), (CAPS, reference[1])):
        got, tokens = engine.encode(TEXTS, caps)
        assert got.dtype == np.float32 and got.shape == (len(TEXTS), engine.dimension)
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert np.array_equal(tokens, want_tokens)
        assert cosines(got, want).min() >= BOUND[precision]


@pytest.mark.parametrize("runtime, precision", RUNTIMES)
def test_batch_invariance(engines, runtime, precision, monkeypatch):
    """A text's vector alone and inside one mixed, padded batch agree within the precision's bound."""
    engine = engines(runtime, precision)
    texts = TEXTS + runtimes.PROBE_TEXTS[::5]
    alone = np.concatenate([engine.encode([text])[0] for text in texts])
    chunked = engine.encode(texts)[0]  # the default chunks: similar lengths, still padded
    monkeypatch.setattr(engine, "chunk_tokens", 1 << 20)  # one chunk: short texts padded to the longest
    padded = engine.encode(texts)[0]
    assert cosines(padded, alone).min() >= BOUND[precision]
    assert cosines(chunked, alone).min() >= BOUND[precision]


def test_second_start_reuses_the_converted_models(engines, cache_dir, monkeypatch):
    engines("openvino", "fp32")  # converted ONNX, then OpenVINO IR, into cache_dir
    files = sorted(p for p in Path(cache_dir).rglob("model.*"))
    assert {p.name for p in files} == {"model.onnx", "model.xml", "model.bin"}
    stamps = [p.stat().st_mtime_ns for p in files]

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(runtimes, "export_onnx", no_conversion)
    monkeypatch.setattr(runtimes, "convert_openvino", no_conversion)
    again = SentenceEmbeddingEngine(config("openvino", "fp32", cache_dir), num_threads=2)
    assert again.info()["runtime"] == "openvino"
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert not [p for p in Path(cache_dir).iterdir() if ".partial-" in p.name]


CONVERT = """
import json, sys, time
from pathlib import Path
import torch
from sentence_transformers import SentenceTransformer
from serve_app.engines import embedding_runtimes as runtimes
from serve_app.engines.embeddings import resolve_model_path

torch.set_num_threads(1)
model = SentenceTransformer(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"), device="cpu").eval()
sample = model.preprocess(["a", "a longer text, padded in the sample"])
target, me = Path(sys.argv[1]), sys.argv[2]
(target.parent / f"ready-{me}").touch()
while len(list(target.parent.glob("ready-*"))) < 2:  # both loaded: convert at the same moment
    time.sleep(0.01)
converted = runtimes.build_cached(target, "model.onnx", lambda d: runtimes.export_onnx(torch, model, sample, d))
print(json.dumps({"converted": converted}))
"""


def test_two_processes_converting_at_once_leave_one_valid_model(tmp_path, engines, reference):
    target = tmp_path / "minilm-onnx"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT, str(target), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    results = [proc.communicate(timeout=240) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in results]
    converted = [json.loads(out.strip().splitlines()[-1])["converted"] for out, _ in results]
    assert sorted(converted) == [False, True]  # one converted; the other waited and reused it
    assert sorted(p.name for p in target.iterdir()) == ["model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("ready-")) == ["minilm-onnx",
                                                                                             "minilm-onnx.lock"]
    backend = runtimes.OnnxRuntimeBackend(target, num_threads=1)
    features = engines("torch", "fp32")._tokenize(TEXTS)
    emb = backend(features)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert cosines(emb, reference[0][0]).min() >= 0.99999


@needs_bf16
def test_unreachable_min_cosine_refuses_to_start(cache_dir):
    with pytest.raises(runtimes.RuntimeRefused) as refused:
        SentenceEmbeddingEngine(config("torch", "bf16", cache_dir, min_cosine=0.9999999), num_threads=2)
    message = str(refused.value)
    assert "runtime torch precision bf16" in message and "min_cosine 0.9999999" in message
    measured = float(message.split("probe texts ")[1].split()[0])
    assert 0.999 < measured < 0.9999999


def test_auto_moves_past_candidates_that_fail(cache_dir, engines, monkeypatch):
    """auto: OpenVINO does not load here (patched) and bf16 misses min_cosine 0.99999:
    the next candidate in the measured order that passes serves, and /info says why."""
    engines("onnxruntime", "fp32")  # the ONNX model is converted already

    def broken(*args, **kwargs):
        raise RuntimeError("no OpenVINO plugin")

    monkeypatch.setattr(runtimes, "OpenVinoBackend", broken)
    engine = SentenceEmbeddingEngine(config("auto", "auto", cache_dir, min_cosine=0.99999), num_threads=2)
    info = engine.info()
    assert (info["runtime"], info["precision"]) == ("onnxruntime", "fp32")
    skipped = info["runtimes_skipped"]
    if BF16:
        assert len(skipped) == 3 and skipped[0] == "openvino bf16: RuntimeError"
        assert skipped[1].startswith("torch bf16: cosine 0.9999")
    assert skipped[-1] == "openvino fp32: RuntimeError"
    # Configured: no fallback.
    with pytest.raises(runtimes.RuntimeRefused, match="openvino precision fp32 did not load: RuntimeError: no OpenVINO"):
        SentenceEmbeddingEngine(config("openvino", "fp32", cache_dir), num_threads=2)


def test_fp16_that_misses_min_cosine_leaves_the_fp32_model_intact(cache_dir, reference, monkeypatch):
    """CUDA's auto order, run on CPU's fp16 kernels: the fp16 candidate is a half copy, so
    after it misses min_cosine the fp32 model still serves, unchanged."""
    monkeypatch.setattr(runtimes, "candidates", lambda *args: ([("torch", "fp16"), ("torch", "fp32")], "auto: test"))
    engine = SentenceEmbeddingEngine(config("auto", "auto", cache_dir, min_cosine=0.999999), num_threads=2)
    info = engine.info()
    assert (info["runtime"], info["precision"], info["min_cosine_measured"]) == ("torch", "fp32", 1.0)
    assert info["runtimes_skipped"][0].startswith("torch fp16: cosine 0.9999")
    assert next(engine.model.parameters()).dtype == engine.torch.float32
    assert cosines(engine.encode(TEXTS)[0], reference[0][0]).min() >= 0.9999999


def test_fp16_on_a_cpu_replica_refuses_to_start():
    cfg = EmbeddingsConfig(runtime={"offline": True, "device": "auto", "precision": "fp16"})
    with pytest.raises(runtimes.RuntimeRefused, match="fp16 needs CUDA, and this replica's device resolved to cpu"):
        SentenceEmbeddingEngine(cfg, num_threads=1)


def test_candidates_follow_the_measured_order():
    cpu = runtimes.AUTO_ORDER["cpu"]
    assert runtimes.candidates("auto", "auto", "cpu", True)[0] == cpu
    assert runtimes.candidates("auto", "auto", "cpu", False)[0] == [c for c in cpu if c[1] != "bf16"]
    assert runtimes.candidates("auto", "auto", "cuda", True)[0] == [("torch", "fp16"), ("torch", "fp32")]
    assert runtimes.candidates("openvino", "auto", "cpu", True)[0] == [("openvino", "bf16"), ("openvino", "fp32")]
    assert runtimes.candidates("auto", "fp32", "cpu", True)[0] == [c for c in cpu if c[1] == "fp32"]
    assert runtimes.candidates("torch", "bf16", "cuda", True) == ([("torch", "bf16")], "configured")
    with pytest.raises(runtimes.RuntimeRefused, match="bf16 needs a CPU with bf16"):
        runtimes.candidates("torch", "bf16", "cpu", False)
    with pytest.raises(runtimes.RuntimeRefused, match="openvino runs on CPU only"):
        runtimes.candidates("openvino", "auto", "cuda", True)


def test_bf16_support_is_read_from_the_cpu_flags(tmp_path):
    for flags, expected in (("fpu avx512f avx512_bf16 amx_tile", True), ("fpu amx_bf16", True), ("fpu avx2 avx512f", False)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert runtimes.cpu_supports_bf16(str(tmp_path / "cpuinfo")) is expected
    assert runtimes.cpu_supports_bf16(str(tmp_path / "missing")) is False


def test_probe_set_spans_short_to_long_texts(engines):
    lengths = engines("torch", "fp32")._tokenize(runtimes.PROBE_TEXTS)["attention_mask"].sum(dim=1)
    assert 32 <= len(runtimes.PROBE_TEXTS) <= 64
    assert int(lengths.min()) <= 4 and int(lengths.max()) >= 200
