"""The embeddings engine alone: texts/s by padded-token budget per forward chunk.

    .venv/bin/python benchmarks/chunk_tokens.py

Same engine class and texts as benchmarks/embeddings.py (2 torch threads), batches of
8, 32 and 64 texts, 3 s each. Picks the CPU default of `chunk_tokens`.
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from embeddings import corpus  # noqa: E402

from serve_app.config import EmbeddingsConfig  # noqa: E402
from serve_app.engines.embeddings import SentenceEmbeddingEngine  # noqa: E402


def main(seconds=3.0):
    engine = SentenceEmbeddingEngine(EmbeddingsConfig(runtime={"offline": True, "device": "cpu"}), num_threads=2)
    texts = corpus(2048)
    sizes = (8, 32, 64)
    print(f"{'chunk_tokens':>12} " + " ".join(f"{n:>6} texts" for n in sizes) + "   (texts/s)")
    for budget in (256, 512, 1024, 2048, 16384):
        engine.chunk_tokens = budget
        row = []
        for size in sizes:
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                i = done % (len(texts) - size)
                engine.encode(texts[i : i + size])
                done += size
            row.append(done / (time.perf_counter() - start))
        print(f"{budget:>12} " + " ".join(f"{v:>12.0f}" for v in row))


if __name__ == "__main__":
    main()
