"""Embeddings runtimes: texts/s and accuracy of each (runtime, precision) the engine can run here.

    .venv/bin/python benchmarks/embedding_runtimes.py [--quick] [--threads 2] [--only openvino:bf16 ...]

Each candidate runs in its own process, as a replica would: the engine class the replica
uses (SentenceEmbeddingEngine, start-up check included, so the fp32 torch reference is
loaded, used and freed as in production), `--threads` threads, texts of 6-40 words,
one text at a time and batches of 8 and 32. Each figure is the best of `--rounds`
timed rounds (this machine is shared and noisy). Accuracy: the lowest cosine to fp32
torch over the corpus, the start-up probe's figure, and batch invariance (each text
alone against inside one mixed, padded batch). Prints a table and one JSON line.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("miner validator subnet embedding latency batch stake permit reward score accuracy replica "
         "router request deadline queue throughput model vector token signature hotkey chain block "
         "the a of to and in is for on with as by at from").split()
CANDIDATES = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]


def corpus(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40))) for _ in range(n)]


def one(args) -> None:
    """Child: one engine, timed; vectors to args.out (.npy), figures as JSON on stdout's last line."""
    from serve_app.config import EmbeddingsConfig
    from serve_app.engines.embeddings import SentenceEmbeddingEngine

    runtime, precision = args.one.split(":")
    cfg = EmbeddingsConfig(runtime={"offline": True, "device": "cpu", "backend": runtime, "precision": precision,
                                    "min_cosine": 0.5, "cache_dir": args.cache_dir})
    started = time.perf_counter()
    engine = SentenceEmbeddingEngine(cfg, num_threads=args.threads)
    start_s = time.perf_counter() - started
    texts = corpus(args.texts)
    rates = {}
    for size in (1, 8, 32):
        best = 0.0
        for _ in range(args.rounds):
            done, i, t0 = 0, 0, time.perf_counter()
            while time.perf_counter() - t0 < args.seconds:
                batch = texts[i : i + size] if i + size <= len(texts) else texts[:size]
                engine.encode(batch)
                done += size
                i = (i + size) % len(texts)
            best = max(best, done / (time.perf_counter() - t0))
        rates[size] = best
    vectors = np.concatenate([engine.encode(texts[i : i + 32])[0] for i in range(0, len(texts), 32)])
    np.save(args.out, vectors)
    # Batch invariance: alone vs inside one padded batch of mixed lengths (one chunk).
    sample = texts[:64] + ["stake", "a much longer text " * 20]
    engine.chunk_tokens = 1 << 20
    together = engine.encode(sample)[0]
    alone = np.concatenate([engine.encode([t])[0] for t in sample])
    invariance = float(np.min(np.sum(together.astype(np.float64) * alone, axis=1)))
    info = engine.info()
    print(json.dumps({"runtime": info["runtime"], "precision": info["precision"], "texts_s": rates,
                      "probe_cosine": info["min_cosine_measured"], "batch_invariance": invariance,
                      "start_s": round(start_s, 1), "libraries": info["libraries"]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="short rounds: a smoke run, not figures")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="per round and batch size")
    parser.add_argument("--texts", type=int, default=512, help="corpus size (the cosine is over all of it)")
    parser.add_argument("--only", nargs="*", help="runtime:precision, e.g. openvino:bf16 (fp32 torch always runs)")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "torchrank-bench-cache"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.texts = 1, 1.0, 96
    if args.one:
        return one(args)

    from serve_app.engines.embedding_runtimes import cpu_supports_bf16

    wanted = [tuple(c.split(":")) for c in args.only] if args.only else CANDIDATES
    wanted = [("torch", "fp32")] + [c for c in wanted if c != ("torch", "fp32")]
    if not cpu_supports_bf16():
        wanted = [c for c in wanted if c[1] != "bf16"]
    results, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for runtime, precision in wanted:
            out = Path(tmp) / f"{runtime}-{precision}.npy"
            command = [sys.executable, __file__, "--one", f"{runtime}:{precision}", "--out", str(out),
                       "--threads", str(args.threads), "--rounds", str(args.rounds), "--seconds", str(args.seconds),
                       "--texts", str(args.texts), "--cache-dir", args.cache_dir]
            run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if run.returncode != 0:
                print(f"{runtime} {precision}: failed\n{run.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(run.stdout.strip().splitlines()[-1])
            vectors = np.load(out)
            reference = vectors if reference is None else reference
            result["cosine"] = float(np.min(np.sum(vectors.astype(np.float64) * reference, axis=1)))
            results.append(result)
    print(f"\n{args.threads} threads, texts of 6-40 words, best of {args.rounds} x {args.seconds:.0f} s; "
          f"cosines vs fp32 torch over {args.texts} texts\n")
    print("| runtime | precision | texts/s b=1 | b=8 | b=32 | × torch fp32 (b=32) | lowest cosine | probe cosine "
          "| batch invariance | start s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = results[0]["texts_s"]["32"] if results else 1.0
    for r in results:
        rates = r["texts_s"]
        print(f"| {r['runtime']} | {r['precision']} | {rates['1']:.0f} | {rates['8']:.0f} | {rates['32']:.0f} | "
              f"{rates['32'] / base:.2f} | {r['cosine']:.6f} | {r['probe_cosine']:.6f} | {r['batch_invariance']:.7f} | "
              f"{r['start_s']} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
