"""What validators send on each kind of route, and how they check the answer.

  embeddings  texts from a seeded pool; every vector's cosine to the reference model's (run in
              the simulator's own process, fp32 torch) must reach MIN_COSINE
  images      seeded prompts; a PNG of the answered size; a re-request of an earlier prompt and
              seed (REPEAT_SHARE of them) must return the same bytes
  agents      tasks with tools the miner offers; the trace must be well-formed, every tool named
              one the request offered (a run that ends without an answer is noted, as the
              protocol allows it)
A check returns (correct, why not): validators score a wrong answer like a refusal.
"""

from __future__ import annotations

import base64
import hashlib
import random
import struct
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

MIN_COSINE = 0.99  # what embedding subnets' validators ask of a vector against their reference
REPEAT_SHARE = 0.3  # of a validator's image requests, once it has answers to repeat
POOL_TEXTS = 128

WORDS = ("miner validator subnet stake weight epoch token model image agent tool answer latency "
         "deadline batch queue replica cluster memory network block chain reward score signal "
         "river mountain city garden winter summer ocean forest library market station bridge "
         "quiet bright ancient rapid golden hidden simple careful distant gentle").split()
PROMPTS = ("a lighthouse at dusk", "a red bicycle in the rain", "an owl on a snowy branch",
           "a bowl of ripe cherries", "a quiet harbour at dawn", "a paper boat on a pond",
           "a fox in tall grass", "a teapot on a wooden table")
DOCUMENTS = ("The validator sets weights once per epoch.", "Embeddings map texts to vectors.",
             "A replica serves one deployment.", "The deadline bounds every request.")


@dataclass
class Work:
    kind: str
    path: str
    payload: dict
    check: Callable[[dict], tuple[bool, str]]  # (correct, why not: "" when correct)
    repeat: bool = False  # images: this re-requests an earlier prompt and seed


def text_pool(n: int = POOL_TEXTS) -> list[str]:
    """The validators' texts: one fixed pool (like a validator's dataset), whatever the run's seed,
    so its reference vectors are computed once."""
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) for _ in range(n)]


def reference_encoder(model_id: str) -> Callable[[list[str]], np.ndarray]:
    """The reference model in this process: sentence-transformers on CPU in fp32, one thread (the
    miner may share this machine). Loads the same id or path the miner loads, the bundled
    weights for the default id."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    from serve_app.engines.embeddings import resolve_model_path

    torch.set_num_threads(1)
    transformers.logging.disable_progress_bar()  # "Loading weights" on the operator's terminal
    model = SentenceTransformer(resolve_model_path(model_id), device="cpu")
    return lambda texts: np.asarray(model.encode(texts, batch_size=32, convert_to_numpy=True), dtype=np.float32)


def cosines(vectors: np.ndarray, reference: np.ndarray) -> np.ndarray:
    a = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    b = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(axis=1)


def png_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from a PNG's IHDR; None when `data` is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


class Payloads:
    """Requests and their checks for one subnet's kinds (kind -> path), seeded."""

    def __init__(self, paths: dict[str, str], reference: Optional[np.ndarray] = None,
                 texts: Optional[list[str]] = None, tools: tuple[str, ...] = (), max_texts: int = 4):
        self.paths = paths
        self.texts = texts or text_pool()
        self.reference = reference  # the pool's reference vectors; None: shapes only
        self.tools = tools  # the agent tools the miner offers
        self.max_texts = max_texts
        self.answered: dict[int, dict[tuple, str]] = {}  # images: validator -> key -> sha256 of the first answer
        self._dimension: Optional[int] = None

    def make(self, validator: int, kind: str, rng: random.Random) -> Work:
        return getattr(self, kind)(validator, rng)

    # -- embeddings --------------------------------------------------------------------------

    def embeddings(self, validator: int, rng: random.Random) -> Work:
        picked = [rng.randrange(len(self.texts)) for _ in range(rng.randint(1, self.max_texts))]
        texts = [self.texts[i] for i in picked]
        payload = {"input": texts if len(texts) > 1 else texts[0]}
        return Work("embeddings", self.paths["embeddings"], payload, lambda data: self._check_embeddings(data, picked))

    def _check_embeddings(self, data: dict, picked: list[int]) -> tuple[bool, str]:
        items = sorted(data.get("data") or [], key=lambda item: item.get("index", 0))
        if len(items) != len(picked):
            return False, f"{len(items)} vectors for {len(picked)} texts"
        try:
            vectors = np.asarray([item["embedding"] for item in items], dtype=np.float32)
        except (KeyError, TypeError, ValueError):
            return False, "vectors of mixed or missing dimensions"
        if vectors.ndim != 2:
            return False, "vectors of mixed dimensions"
        if not np.isfinite(vectors).all():
            return False, "vectors that are not finite numbers"
        if self.reference is None:
            self._dimension = self._dimension or vectors.shape[1]
            if vectors.shape[1] != self._dimension:
                return False, f"dimension {vectors.shape[1]}, earlier answers {self._dimension}"
            return True, ""
        reference = self.reference[picked]
        if vectors.shape[1] != reference.shape[1]:
            return False, f"dimension {vectors.shape[1]}, the reference model's {reference.shape[1]}"
        low = float(cosines(vectors, reference).min())
        return (True, "") if low >= MIN_COSINE else (False, f"cosine {low:.3f} to the reference, under {MIN_COSINE}")

    # -- images ------------------------------------------------------------------------------

    def _answered(self, validator: int) -> dict[tuple, str]:
        return self.answered.setdefault(validator, {})

    def images(self, validator: int, rng: random.Random) -> Work:
        answered = self._answered(validator)
        repeat = bool(answered) and rng.random() < REPEAT_SHARE
        key = rng.choice(sorted(answered)) if repeat else (rng.choice(PROMPTS), rng.randrange(2 ** 31))
        payload = {"prompt": key[0], "n": 1, "seed": key[1], "response_format": "b64_json"}
        return Work("images", self.paths["images"], payload, lambda data: self._check_image(data, validator, key),
                    repeat=repeat)

    def _check_image(self, data: dict, validator: int, key: tuple) -> tuple[bool, str]:
        items = data.get("data") or []
        if len(items) != 1:
            return False, f"{len(items)} images for n=1"
        try:
            png = base64.b64decode(items[0]["b64_json"], validate=True)
        except (KeyError, TypeError, ValueError):
            return False, "b64_json missing or not base64"
        size = png_size(png)
        if size is None:
            return False, "not a PNG"
        if data.get("size") and f"{size[0]}x{size[1]}" != data["size"]:
            return False, f"a {size[0]}x{size[1]} PNG, answered as {data['size']}"
        if items[0].get("seed") != key[1]:
            return False, f"seed {items[0].get('seed')}, asked {key[1]}"
        digest = hashlib.sha256(png).hexdigest()
        first = self._answered(validator).setdefault(key, digest)
        return (True, "") if first == digest else (False, "a seeded re-request returned other bytes")

    # -- agents ------------------------------------------------------------------------------

    def agents(self, validator: int, rng: random.Random) -> Work:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        offered = [t for t in ("calculator", "retrieve", "scratchpad") if t in self.tools]
        tools = rng.sample(offered, k=min(len(offered), rng.randint(1, 2))) if offered else []
        payload: dict = {"task": f"what is {a} * {b}?", "tools": tools}
        if "retrieve" in tools:
            payload["task"] = f"which document is about validators, and what is {a} * {b}?"
            payload["documents"] = list(DOCUMENTS)
        return Work("agents", self.paths["agents"], payload, lambda data: check_trace(data, set(tools)))


def check_trace(data: dict, offered: set[str]) -> tuple[bool, str]:
    """A well-formed trace (the agent-runs protocol) whose every tool is one the request offered."""
    if data.get("finish") not in ("answer", "max_steps"):
        return False, f"finish {data.get('finish')!r}"
    if data["finish"] == "answer" and not isinstance(data.get("answer"), str):
        return False, "finish answer without an answer string"
    steps = data.get("steps")
    if not isinstance(steps, list):
        return False, "no steps list"
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or not isinstance(step.get("ms"), (int, float)) or step["ms"] < 0:
            return False, f"step {i} is not a step"
        tool = step.get("tool")
        if tool is None:  # a malformed model action: recorded with its error, no tool ran
            if not isinstance(step.get("error"), str):
                return False, f"step {i} names no tool and no error"
            continue
        if tool not in offered:
            return False, f"step {i} calls {tool!r}, not offered"
        if not isinstance(step.get("args"), dict) or (("result" in step) == ("error" in step)):
            return False, f"step {i} ({tool}) lacks args or has not exactly one of result and error"
    return True, ""
