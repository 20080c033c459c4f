"""Inference runtimes for the sentence-embeddings engine: torch, ONNX Runtime and OpenVINO.

A backend maps one padded chunk of tokenizer features (torch tensors already cut to the
chunk's width) to float32 sentence embeddings [rows, dim]; the engine tokenizes, sorts,
chunks, caps and normalises the same way whichever backend runs. ONNX and OpenVINO models
are converted from the loaded sentence-transformers model (the whole forward, so pooling
stays the model's own) once per weights digest, runtime and opset, and cached under
`cache_dir`; replicas starting together convert once (a lock) and only a complete
conversion is ever renamed into place (build_once). Knows nothing of Serve.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from serve_app.engines.weights import build_once

log = logging.getLogger("ray.serve.torchrank.embeddings")

OPSET = 17

# (runtime, precision) that can run, per device. onnxruntime and openvino are the CPU
# packages from PyPI; fp16 is CUDA only; bf16 only where the CPU has bf16 instructions.
SUPPORTED = {
    "cpu": [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")],
    "cuda": [("torch", "fp16"), ("torch", "bf16"), ("torch", "fp32")],
}
# `auto`: fastest first, as measured for the engine on a 2-thread AVX512-BF16 CPU
# (benchmarks/embedding_runtimes.py, benchmarks/README.md); each must still pass min_cosine.
AUTO_ORDER = {
    "cpu": [("openvino", "bf16"), ("torch", "bf16"), ("openvino", "fp32"), ("onnxruntime", "fp32"), ("torch", "fp32")],
    "cuda": [("torch", "fp16"), ("torch", "fp32")],
}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


class RuntimeRefused(RuntimeError):
    """The configured runtime/precision cannot run here, or fails the start-up accuracy check."""


def cpu_supports_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU has native bf16 (avx512_bf16 or amx_bf16 in its flags)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return any(flag in flags for flag in BF16_CPU_FLAGS)
    return False


def candidates(runtime: str, precision: str, device: str, bf16_ok: bool) -> tuple[list[tuple[str, str]], str]:
    """The (runtime, precision) pairs to try in order, and why (for the start-up log).

    Only the `auto` parts of the configuration are free: an explicit pair is the only
    candidate. Raises RuntimeRefused, with what to change, when nothing configured can run.
    """
    if precision == "fp16" and device != "cuda":
        raise RuntimeRefused(
            f"embeddings precision fp16 needs CUDA, and this replica's device resolved to {device}: "
            "set precision to auto, fp32 or bf16")
    if runtime in ("onnxruntime", "openvino") and device != "cpu":
        raise RuntimeRefused(
            f"embeddings runtime {runtime} runs on CPU only (the PyPI build), and this replica's device "
            f"resolved to {device}: set runtime to auto or torch, or device to cpu")
    if precision == "bf16" and device == "cpu" and not bf16_ok:
        raise RuntimeRefused(
            "embeddings precision bf16 needs a CPU with bf16 instructions (flags "
            f"{' or '.join(BF16_CPU_FLAGS)}), and this CPU has neither: set precision to auto or fp32")
    explicit = runtime != "auto" and precision != "auto"
    pool = SUPPORTED[device] if explicit else AUTO_ORDER[device]
    found = [(r, p) for r, p in pool
             if runtime in ("auto", r) and precision in ("auto", p) and (p != "bf16" or bf16_ok)]
    if not found:
        raise RuntimeRefused(f"embeddings runtime {runtime} with precision {precision} is not available on {device}")
    if explicit:
        return found, "configured"
    where = "CUDA" if device == "cuda" else ("a CPU with bf16" if bf16_ok else "a CPU without bf16")
    return found, f"auto: the fastest measured on {where} that passes min_cosine"


# ---- the probe set of the start-up accuracy check -------------------------------------

_SENTENCES = [
    "Validators score miners on accuracy, reliability and latency.",
    "The router checks each request's hotkey signature before any model sees it.",
    "Embeddings of concurrent requests share one forward pass.",
    "A replica that falls behind sheds load instead of queueing forever.",
    "The quick brown fox jumps over the lazy dog.",
    "Rain is expected tomorrow afternoon, with clearer skies by the weekend.",
    "She poured the coffee, opened the window and read the letter twice.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The central bank held interest rates steady at 4.25% for the third month.",
    "def encode(texts): return [model(t) for t in texts]  # one at a time",
    "SELECT hotkey, stake FROM neurons WHERE validator_permit = 1 ORDER BY stake DESC;",
    "Le chat dort sur le canapé pendant que la pluie tombe.",
    "Die Mannschaft gewann das Spiel in der letzten Minute.",
    "¿Dónde está la estación de tren más cercana?",
    "Mount Everest is 8,849 metres tall; K2 is 8,611 metres.",
    "Error 503: the service is unavailable, retry after 2 seconds.",
    "Grandma's apple pie recipe calls for cinnamon, nutmeg and a pinch of salt.",
    "The telescope captured faint light from a galaxy thirteen billion years old.",
    "Please reset my password; I no longer have access to the old e-mail address.",
    "Tokenizers split rare words into sub-word pieces like ##ing and ##tion.",
    "Heavy traffic on the bridge delayed the morning commute by forty minutes.",
    "An attention mask tells the model which positions are padding.",
    "Quantum computers use qubits that can be in superpositions of states.",
    "The museum reopened after restoring its collection of medieval manuscripts.",
]
_SHORT = ["stake", "hello", "GPU", "a short one", "what is the time?", "miner uptime", "42",
          "bonjour le monde", "ok", "deep learning", "embeddings API", "rate limited", "🙂 thanks!",
          "weights digest", "tempo 360", "cold key"]


_PARAGRAPH_SENTENCES = (2, 3, 5, 7, 10, 14, 19, 26)


def probe_texts() -> list[str]:
    """40 fixed texts: 16 of 1-4 words (bf16 strays most on these), 16 single sentences and
    8 paragraphs of about 30 to 450 tokens (the longest cut at the model's max_seq_length,
    as requests are). Few enough that the start-up check stays cheap next to loading the
    model (figures: benchmarks/README.md, "Embeddings runtimes")."""
    long = [" ".join(_SENTENCES[(i * 7 + j) % len(_SENTENCES)] for j in range(count))
            for i, count in enumerate(_PARAGRAPH_SENTENCES)]
    return _SHORT + _SENTENCES[:16] + long


PROBE_TEXTS = probe_texts()


def lowest_cosine(vectors: np.ndarray, reference: np.ndarray) -> float:
    """Lowest row-wise cosine, in float64, rounded to the 7 digits float32 vectors carry
    (identical vectors give 1.0, so min_cosine 1.0 means "as fp32 torch")."""
    a, b = vectors.astype(np.float64), reference.astype(np.float64)
    cosines = np.sum(a * b, axis=1) / np.sqrt(np.sum(a * a, axis=1) * np.sum(b * b, axis=1))
    return round(float(np.min(cosines)), 7)


# ---- backends --------------------------------------------------------------------------

class TorchBackend:
    """The sentence-transformers model itself: fp32; bf16 through autocast; fp16 as a .half() model (CUDA)."""

    runtime = "torch"

    def __init__(self, model, torch, device: str, precision: str):
        self.model, self.torch, self.device, self.precision = model, torch, device, precision
        if precision == "fp16":
            model.half()
        self.libraries = {}

    def __call__(self, batch: dict) -> np.ndarray:
        torch = self.torch
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.inference_mode(), torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            emb = self.model(batch)["sentence_embedding"]
        return emb.float().cpu().numpy()


class OnnxRuntimeBackend:
    """An exported ONNX model on ONNX Runtime's CPU execution provider, fp32."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, num_threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.precision = "fp32"
        self.libraries = {"onnxruntime": ort.__version__}

    def __call__(self, batch: dict) -> np.ndarray:
        feeds = {name: np.ascontiguousarray(batch[name].numpy()) for name in self.inputs}
        return self.session.run(None, feeds)[0]


class OpenVinoBackend:
    """OpenVINO IR on the CPU plugin; f32 or bf16 through INFERENCE_PRECISION_HINT."""

    runtime = "openvino"

    def __init__(self, path: Path, num_threads: int, precision: str):
        import openvino as ov

        self.compiled = ov.Core().compile_model(str(path / "model.xml"), "CPU", {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": num_threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            # Replicas share cores with the router and with each other: do not pin threads.
            "ENABLE_CPU_PINNING": False,
        })
        self.request = self.compiled.create_infer_request()
        self.inputs = [port.get_any_name() for port in self.compiled.inputs]
        self.precision = precision
        self.libraries = {"openvino": ov.__version__}

    def __call__(self, batch: dict) -> np.ndarray:
        self.request.infer({name: np.ascontiguousarray(batch[name].numpy()) for name in self.inputs})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)


# ---- conversion, cached -------------------------------------------------------------------

def _make_wrapper(torch, model, constants: dict):
    class SentenceEmbedding(torch.nn.Module):
        """Keyword tensor inputs -> the SentenceTransformer's own `sentence_embedding`."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            features = {"input_ids": input_ids, "attention_mask": attention_mask, **constants}
            if token_type_ids is not None:
                features["token_type_ids"] = token_type_ids
            return self.model(features)["sentence_embedding"]

    return SentenceEmbedding().eval()  # eval: the exporter traces the wrapper's mode (dropout)


def export_onnx(torch, model, sample: dict, directory: Path) -> None:
    """Write directory/model.onnx: the whole forward, dynamic batch and sequence axes.

    `sample` is tokenizer output for texts of different lengths: the traced graph must see
    padding, or a library may drop the attention mask as all ones.
    """
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]
    if bool(sample["attention_mask"].all()):
        raise ValueError("the export sample must contain padding")
    constants = {k: v for k, v in sample.items() if not isinstance(v, torch.Tensor)}
    wrapper = _make_wrapper(torch, model, constants)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["sentence_embedding"] = {0: "batch"}
    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # TracerWarnings, the legacy-exporter notice
        # Names follow forward()'s parameter order: the exporter binds them positionally.
        torch.onnx.export(wrapper, (), str(directory / "model.onnx"), kwargs={n: sample[n] for n in names},
                          input_names=names, output_names=["sentence_embedding"], dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False)


def convert_openvino(onnx_dir: Path, directory: Path) -> None:
    """Write directory/model.xml + .bin from the ONNX model, weights kept in f32."""
    import openvino as ov

    directory.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(str(onnx_dir / "model.onnx")), str(directory / "model.xml"), compress_to_fp16=False)


def source_digest(torch, model, weights_sha256: Optional[str]) -> str:
    """What a converted model depends on: the weights (the files' digest, else the state
    dict's), the module stack (pooling, normalisation) and the exporting torch."""
    digest = hashlib.sha256()
    if weights_sha256:
        digest.update(weights_sha256.encode())
    else:
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(repr(model).encode())
    digest.update(f"torch {torch.__version__}, opset {OPSET}".encode())
    return digest.hexdigest()[:16]


def build_cached(path: Path, marker: str, write: Callable[[Path], None]) -> bool:
    """build_once under an exclusive lock: True when this process converted, False when it
    found the files (from an earlier start, or from a replica that held the lock first)."""
    path = Path(path)
    if (path / marker).exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / marker).exists():
            return False

        def fresh(staging: Path) -> None:
            shutil.rmtree(staging, ignore_errors=True)  # left by a killed process with this pid
            write(staging)

        build_once(path, marker, fresh)
        return True


def converted(runtime: str, torch, model, sample: dict, cache_dir: str, name: str, digest: str) -> Path:
    """The cached ONNX (runtime onnxruntime) or OpenVINO IR (openvino) directory, converted if missing."""
    root = Path(cache_dir).expanduser() / "embeddings"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name.rstrip("/").split("/")[-1])
    onnx_dir = root / f"{safe}-{digest}-onnx"
    if build_cached(onnx_dir, "model.onnx", lambda d: export_onnx(torch, model, sample, d)):
        log.info("exported %s to ONNX (opset %d) in %s", name, OPSET, onnx_dir)
    if runtime == "onnxruntime":
        return onnx_dir
    import openvino as ov

    ov_dir = root / f"{safe}-{digest}-openvino-{ov.__version__.split('-')[0]}"
    if build_cached(ov_dir, "model.xml", lambda d: convert_openvino(onnx_dir, d)):
        log.info("converted %s to OpenVINO IR in %s", name, ov_dir)
    return ov_dir
