"""The `Router` deployment: the subnet axon in front of the workloads, as a thin Serve shell.

It wires the pieces and hands each request on: the request path is
serve_app/router/pipeline.py, the routes and their guards routes.py, the background
loops and per-request records monitor.py, `/ready`, `/info` and the OpenAPI document
endpoints.py, the edge's state for HAProxy edge.py.

The ingress stays a FastAPI app: a plain `__call__` (tried: Serve hands it a Starlette Request)
lost the cancellation of a request whose caller hangs up (tests/serve/test_agents.py). The
subnet routes skip FastAPI's routing all the same (`PipelineFirst`): they are the traffic.
"""

# No `from __future__ import annotations`: FastAPI must see real types through serve.ingress.
import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import DEFAULT_HTTP_PORT, MinerConfig
from serve_app.economics.keeper import ledger_keeper
from serve_app.errors import json_bytes, json_response, retry_after
from serve_app.observability.info import BuildInfo
from serve_app.observability.metrics import RouterMetrics
from serve_app.router import endpoints
from serve_app.router.auth import STORE_START_S, Authenticator, shared_nonce_store
from serve_app.router.body import BodyReads
from serve_app.router.edge import EdgeKeeper, edge_dir
from serve_app.router.monitor import RouterMonitor
from serve_app.router.pipeline import RequestPipeline
from serve_app.protocols.registry import workload_adapter
from serve_app.router.rollouts import RolloutRouter, rollout_coordinator
from serve_app.router.routes import build_routes

def request_id() -> str:
    """Serve's id for this request, which its proxy also returns as x-request-id."""
    try:
        return serve.context._get_serve_request_context().request_id
    except Exception:
        return "-"


def replica_names() -> tuple[str, str]:
    """(short id, actor name in Serve's namespace: how another replica asks Ray whether it lives)."""
    try:
        replica = serve.get_replica_context().replica_id
        return replica.unique_id, replica.to_full_id_str()
    except Exception:
        return "local", "local"


def http_port() -> int:
    """The port Serve listens on (http_options.port): a configured endpoint's default port."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.port
    except Exception:  # outside a Serve cluster
        return DEFAULT_HTTP_PORT


async def start_rollouts(cfg: MinerConfig, workloads: dict, candidates: dict, metrics: RouterMetrics) -> dict:
    """workload -> its RolloutRouter, started (the shared state read), for each workload with a candidate."""
    if not candidates:
        return {}
    coordinator = await asyncio.to_thread(rollout_coordinator, cfg.name)
    rollouts = {}
    for name, candidate in candidates.items():
        wl = getattr(cfg.workloads, name)
        rollouts[name] = RolloutRouter(
            name, wl.canary, workloads[name], candidate, workload_adapter(name), coordinator, metrics,
            stable_model=wl.model.id, candidate_model=wl.canary.model,
            # Requests already on the losing side finish (at most the longest deadline) before it is retired.
            drain_s=max(subnet.max_timeout_s for subnet in cfg.subnets) + 2.0,
            # The agents' retrieve tool calls the stable embeddings deployment.
            keep_stable=name == "embeddings" and cfg.workloads.agents is not None)
        await rollouts[name].start()
    return rollouts


async def start_ledger(cfg: MinerConfig, app_name: str):
    """The ledger keeper, told this config (an existing one may hold an older); None when it does
    not answer in time: the router serves without it and looks for it again when it hands its
    counts on (RouterMonitor.flush_ledger)."""
    try:
        keeper = await asyncio.wait_for(asyncio.to_thread(ledger_keeper, cfg, app_name), 10)
        await asyncio.wait_for(keeper.configure.remote(cfg, app_name), 10)
        return keeper
    except Exception as exc:
        logging.getLogger("ray.serve.torchrank.router").warning(
            "no ledger keeper yet (%s: %s): serving on, trying again later", type(exc).__name__, exc)
        return None


class PipelineFirst:
    """ASGI middleware: a request to a subnet route goes straight to the replica's pipeline
    (`app.state.pipeline`); FastAPI's routing, dependency solving and response wrapping (0.5-0.9 ms
    of the router's CPU per request on 2 cores: benchmarks/README.md, issue 31) serve the others.
    Still inside the ASGI call Serve makes, so a caller's hang-up cancels the request as before."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        pipeline = getattr(scope["app"].state, "pipeline", None) if scope["type"] == "http" else None
        if pipeline is not None:
            request = Request(scope, receive)
            if request.url.path in pipeline.routes:
                response = await pipeline.handle(request, request_id())
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


app = FastAPI(title="torchrank-miner", openapi_url=None, docs_url=None, redoc_url=None)
app.add_middleware(PipelineFirst)


@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    async def __init__(self, cfg: MinerConfig, workloads: dict[str, DeploymentHandle], build: BuildInfo,
                       candidates: dict[str, DeploymentHandle] | None = None):
        replica, actor_name = replica_names()
        self.auth = Authenticator(cfg.wallet.hotkey_ss58(), shared_nonce_store(cfg.name), claimant=actor_name,
                                  find_store=lambda: shared_nonce_store(cfg.name))
        if not await self.auth.wait_for_store(STORE_START_S):
            logging.getLogger("ray.serve.torchrank.router").warning(
                "the shared replay store did not answer within %.0f s: signed requests get 503 until it does",
                STORE_START_S)
        r = cfg.router
        body_reads = BodyReads(r.max_body_reads, r.max_body_bytes, r.body_timeout_s, r.body_grace_s,
                               r.min_body_bytes_per_s)
        metrics = RouterMetrics()
        rollouts = await start_rollouts(cfg, workloads, candidates or {}, metrics)
        table = await build_routes(cfg, workloads, rollouts)
        app_name = serve.get_replica_context().app_name
        keeper = await start_ledger(cfg, app_name)
        self.monitor = RouterMonitor(cfg, table, workloads, build, hotkey=self.auth.self_hotkey_ss58,
                                     http_port=await asyncio.to_thread(http_port), metrics=metrics, rollouts=rollouts,
                                     keeper=keeper, app_name=app_name)
        self.edge = EdgeKeeper(r.edge, app_name, replica, r.num_replicas, table, await asyncio.to_thread(edge_dir),
                               on_refused=self.monitor.record_edge)
        self.pipeline = RequestPipeline(table.routes, self.auth, body_reads, max_in_progress=r.max_in_progress,
                                        workload_ready=self.monitor.workload_ready, record=self.monitor.record,
                                        replica=replica, edge=self.edge)
        app.state.pipeline = self.pipeline
        self.monitor.start(self.pipeline.in_flight)
        self.edge.start()
        self.page_cache = endpoints.PublicPage(self.monitor, self.auth.self_hotkey_ss58)
        self.info_cache = endpoints.Cached(self._info_bytes, endpoints.INFO_TTL_S)
        self.openapi_bytes = json_bytes(endpoints.openapi(self.pipeline.routes))  # fixed while the replica lives


    async def _info_bytes(self) -> bytes:
        return json_bytes(await endpoints.info(self.monitor, self.auth.self_hotkey_ss58, self.edge))

    async def check_health(self) -> None:
        """Serve's health check: the shared replay store (see Authenticator.check_store)."""
        await self.auth.check_store()

    # async: FastAPI runs a plain `def` in its thread pool, a thread hop per health check.
    @app.get("/health")
    async def health(self):
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/ready")
    async def ready(self):
        body, ok = endpoints.readiness(self.monitor)
        return json_response(body, 200 if ok else 503, None if ok else retry_after(5))

    @app.get("/info")
    async def info(self):
        return Response(await self.info_cache.get(), media_type="application/json")

    @app.get("/")
    async def page(self):
        return HTMLResponse(await self.page_cache.get())

    @app.get("/openapi.json")
    async def openapi(self):
        return Response(self.openapi_bytes, media_type="application/json")

    # Unknown paths (404, in the catalogue's JSON); the routes themselves arrive by PipelineFirst.
    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def dispatch(self, request: Request, path: str):
        return await self.pipeline.handle(request, request_id())
