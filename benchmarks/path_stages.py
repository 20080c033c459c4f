"""Where the time goes on the request path: each stage's cost, measured in one run.

    .venv/bin/python benchmarks/path_stages.py

Against the embedded default under `serve`: p50 at concurrency 1 and throughput at
concurrency 32 for requests that stop at successive stages -- the proxy alone
(/health), unsigned (401), signed but invalid (422: signature, shared replay check
and authorisation done, no model), and a full single-text embedding (200).
"""

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from embeddings import corpus, drive, pct  # noqa: E402

from serve_app import rayenv  # noqa: E402
from serve_app.app import build_app, load_config  # noqa: E402
from serve_app.client import signed_request, signer_for  # noqa: E402


def main(port=8125):
    import ray
    from ray import serve

    base = load_config(ROOT / "deployments" / "local.yaml")
    subnet = base.subnets[0].model_copy(update={"auth": base.subnets[0].auth.model_copy(update={"max_age_s": 300.0})})
    cfg = base.model_copy(update={"subnets": (subnet,)})
    rayenv.apply()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="stages", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    signer, miner, texts = signer_for("//Alice"), cfg.wallet.hotkey_ss58(), corpus(1200)

    def stage(kind, n):
        if kind == "health":
            return [(None, None, 1)] * n
        if kind == "unsigned":
            return [(b'{"input": "x"}', {}, 1)] * n
        key = "inputs" if kind == "signed-422" else "input"
        return [(*signed_request(signer, "/v1/embeddings", {key: texts[i % len(texts)]}, miner), 1) for i in range(n)]

    try:
        print(f"{'stage':<12} {'c1 p50 ms':>10} {'c32 req/s':>10}  statuses")
        for kind in ("health", "unsigned", "signed-422", "embed-200"):
            path = url + ("/health" if kind == "health" else "/v1/embeddings")
            asyncio.run(drive(path, stage(kind, 20), 1))
            lat, _, _ = asyncio.run(drive(path, stage(kind, 150), 1))
            _, statuses, wall = asyncio.run(drive(path, stage(kind, 1000), 32))
            print(f"{kind:<12} {pct(lat, 0.5):>10.1f} {1000 / wall:>10.0f}  {statuses}")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
