"""Why all torch work runs on one thread (serve_app/inference/thread.py).

    .venv/bin/python benchmarks/engine_thread.py

The same one-text MiniLM encode, p50 over 80 calls, each case in a fresh process
(a thread that once ran torch keeps its OpenMP team): on the thread that loaded the
model, from another worker thread (two teams), and with load and calls on one
dedicated EngineThread (what the Embeddings replica does).
"""

import asyncio
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serve_app.app import load_config  # noqa: E402
from serve_app.engines.embeddings import SentenceEmbeddingEngine  # noqa: E402
from serve_app.inference.thread import EngineThread  # noqa: E402

TEXT = ["the miner serves embeddings quickly"]


def p50(fn, n=80):
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        lat.append((time.perf_counter() - t0) * 1000)
    return statistics.median(lat)


def measure(case: str) -> float:
    cfg = load_config(ROOT / "deployments" / "local.yaml").workloads.embeddings
    if case == "EngineThread (load+run)":
        thread = EngineThread("bench")
        engine = thread.run_sync(SentenceEmbeddingEngine, cfg, 2)
        return p50(lambda: thread.run_sync(engine.encode, TEXT))
    engine = SentenceEmbeddingEngine(cfg, 2)
    if case == "loading thread":
        return p50(lambda: engine.encode(TEXT))
    if case == "another thread":
        other = ThreadPoolExecutor(1)
        return p50(lambda: other.submit(engine.encode, TEXT).result())
    loop = asyncio.new_event_loop()
    return p50(lambda: loop.run_until_complete(asyncio.to_thread(engine.encode, TEXT)))


CASES = ("loading thread", "another thread", "asyncio.to_thread", "EngineThread (load+run)")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        print(measure(sys.argv[2]))
        return
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, check=True)
        print(f"{case:<26} p50 {float(out.stdout.split()[-1]):5.1f} ms")


if __name__ == "__main__":
    main()
