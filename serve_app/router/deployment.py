"""The `Router` deployment: the subnet axon in front of the workloads.

The request path, in order; a request refused at any step stops there and never
reaches a workload:
  route (404) -> body under the cap (413) -> btauth/1 signature + shared replay check (401)
  -> authorisation from the subnet's metagraph (403) -> schema and limits (422)
  -> workload call under the deadline (504) -> response.
"""

# No `from __future__ import annotations`: FastAPI must see real types through serve.ingress.
import asyncio
import logging
import time
from dataclasses import dataclass

import ray
from fastapi import FastAPI, Request
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import __version__
from serve_app.chain.metagraph import MetagraphCache, make_source
from serve_app.config import MinerConfig, PROTOCOL_WORKLOAD, SubnetConfig
from serve_app.errors import ApiError, error_response, json_response, not_found, unavailable
from serve_app.observability import logs
from serve_app.observability.info import BuildInfo
from serve_app.observability.metrics import RouterMetrics
from serve_app.protocols.base import Adapter
from serve_app.protocols.registry import make_adapter
from serve_app.router.auth import Authenticator, shared_nonce_store
from serve_app.router.body import read_capped
from serve_app.router.policy import authorise, caller_class

log = logging.getLogger("ray.serve.torchrank.router")
GAUGE_PERIOD_S = 1.0  # under the agent's gauge TTL (2 export periods, 2 s at the fastest)

app = FastAPI(title="torchrank-miner", version=__version__, openapi_url=None, docs_url=None, redoc_url=None)

AUTH_HEADERS = ["X-Bittensor-Version", "X-Bittensor-Hotkey", "X-Bittensor-Nonce", "X-Bittensor-Signature"]


@dataclass(frozen=True)
class Route:
    path: str
    subnet: SubnetConfig
    metagraph: MetagraphCache
    adapter: Adapter
    workload: DeploymentHandle


def signed_target(request: Request) -> str:
    """The request target exactly as the client sent it (path and query): what btauth/1 signs."""
    scope = request.scope
    target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    query = scope.get("query_string") or b""
    return f"{target}?{query.decode('latin-1')}" if query else target


def request_id() -> str:
    """Serve's id for this request, which its proxy also returns as x-request-id."""
    try:
        return serve.context._get_serve_request_context().request_id
    except Exception:
        return "-"


def replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return "local"


@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    async def __init__(self, cfg: MinerConfig, workloads: dict[str, DeploymentHandle], build: BuildInfo):
        self.cfg = cfg
        self.build = build
        self.workloads = workloads
        self.workload_info: dict[str, dict] = {}
        self.replica = replica_id()
        self.auth = Authenticator(cfg.wallet.hotkey_ss58(), shared_nonce_store(cfg.name))
        self.metagraphs: dict[int, MetagraphCache] = {}
        self.routes: dict[str, Route] = {}
        for subnet in cfg.subnets:
            cache = MetagraphCache(make_source(subnet.metagraph, subnet.netuid), subnet.metagraph.refresh_s)
            await cache.refresh()  # a failed first read leaves requests at 503 until a refresh succeeds
            cache.start()
            self.metagraphs[subnet.netuid] = cache
            for route in subnet.routes:
                self.routes[subnet.prefix + route.path] = Route(
                    path=subnet.prefix + route.path,
                    subnet=subnet,
                    metagraph=cache,
                    adapter=make_adapter(route.protocol, cfg),
                    workload=workloads[PROTOCOL_WORKLOAD[route.protocol]],
                )
        self.metrics = RouterMetrics()
        models = {"embeddings": cfg.workloads.embeddings.model if cfg.workloads.embeddings else None}
        self.model_ids = ",".join(f"{workload}={model}" for workload, model in models.items() if model)
        self.in_flight = {subnet.netuid: 0 for subnet in cfg.subnets}
        self._background = [asyncio.create_task(self._publish_gauges()), asyncio.create_task(logs.flush_every())]

    async def _publish_gauges(self) -> None:
        # Ray exports a gauge value only for a while after it is set: publish them all again each period.
        while True:
            try:
                self.metrics.publish_slos(self.cfg.subnets)
                self.metrics.build.set(1, {"version": self.build.version, "git_sha": self.build.git_sha,
                                           "models": self.model_ids})
                for netuid, count in self.in_flight.items():
                    self.metrics.in_flight.set(count, {"netuid": str(netuid)})
                for netuid, cache in self.metagraphs.items():
                    if cache.view is not None:  # absent, not zero, until the first read
                        self.metrics.metagraph_age.set(cache.age_s, {"netuid": str(netuid)})
                        self.metrics.metagraph_block.set(cache.view.block, {"netuid": str(netuid)})
            except Exception:  # the staleness alert depends on this loop: never let it die
                log.exception("publishing router gauges failed")
            await asyncio.sleep(GAUGE_PERIOD_S)

    @app.get("/health")
    def health(self):
        return {"status": "ok"}

    @app.get("/info")
    async def info(self):
        """Transparency for validators: version, uptime, subnets, models, recent changes. No secrets."""
        build = self.build.as_dict()
        subnets = []
        for subnet in self.cfg.subnets:
            cache = self.metagraphs[subnet.netuid]
            age = cache.age_s
            subnets.append({
                "netuid": subnet.netuid,
                "routes": [subnet.prefix + route.path for route in subnet.routes],
                "metagraph": {"source": subnet.metagraph.source,
                              "block": cache.view.block if cache.view is not None else None,
                              "age_s": None if age is None else round(age, 1)},
                "timeout_s": subnet.timeout_s,
            })
        return json_response({
            "version": build["version"],
            "git_sha": build["git_sha"],
            "started_at": build["started_at"],
            "uptime_s": build["uptime_s"],
            "hotkey": self.auth.self_hotkey_ss58,
            "subnets": subnets,
            "workloads": {name: await self._workload_info(name) for name in self.workloads},
            "changes": build["changes"],
        })

    async def _workload_info(self, name: str) -> dict:
        # Model identity does not change while a deployment lives: ask once, keep it.
        if name not in self.workload_info:
            try:
                self.workload_info[name] = await asyncio.wait_for(self.workloads[name].info.remote(), 5)
            except Exception:
                return {"status": "unavailable"}
        return self.workload_info[name]

    @app.get("/openapi.json")
    def openapi(self):
        return self._openapi()

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def dispatch(self, request: Request, path: str):
        rid = request_id()
        started = time.perf_counter()
        headers = {"X-Miner-Replica": self.replica}
        route = self.routes.get(request.url.path)
        caller, who, outcome, status, admitted, response = "-", "unauthenticated", "internal_error", 500, False, None
        if route is not None:
            self.in_flight[route.subnet.netuid] += 1  # published by _publish_gauges
        try:
            if route is None:
                raise not_found(request.url.path)
            if request.method != "POST":
                raise ApiError(405, "method_not_allowed", f"{route.path} accepts POST", {"Allow": "POST"})
            body = await read_capped(request, self.cfg.router.max_body_bytes)
            caller = await self.auth.authenticate(
                request.headers, body, method=request.method, path=signed_target(request), policy=route.subnet.auth
            )
            who = caller_class(caller, route.metagraph.view, route.subnet.auth)
            authorise(caller, route.metagraph.view, route.subnet.auth)
            parsed = route.adapter.parse(body)
            admitted = True
            result = await self._call_workload(route, parsed)
            outcome, status = "ok", 200
            response = json_response(result, headers=headers)
        except ApiError as err:
            outcome, status = err.code, err.status
            response = error_response(err, headers)
        except Exception:
            log.exception("request %s failed inside the miner", rid)
            response = error_response(ApiError(500, "internal_error", f"the miner failed this request (id {rid})"), headers)
        finally:
            seconds = time.perf_counter() - started
            if route is not None:
                self.in_flight[route.subnet.netuid] -= 1
                netuid, path_label, workload, slo_s = (str(route.subnet.netuid), route.path,
                                                       route.adapter.workload, route.subnet.slo.latency_s)
            else:
                netuid, path_label, workload, slo_s = "-", "unmatched", "-", None
            self.metrics.record(netuid, path_label, workload, outcome, who, seconds,
                                len(response.body) if response is not None else 0, admitted, slo_s)
            # Never the body, signature or headers: only who, where and how it ended.
            logs.request_line(netuid=netuid, caller=caller, caller_class=who, path=request.url.path,
                              status=status, outcome=outcome, admitted=admitted, ms=round(seconds * 1000, 2))
        return response

    async def _call_workload(self, route: Route, parsed) -> dict:
        timeout = route.subnet.timeout_s
        try:
            return await asyncio.wait_for(route.adapter.run(parsed, route.workload), timeout)
        except asyncio.TimeoutError:
            raise ApiError(504, "deadline_exceeded", f"the work did not finish within {timeout:g}s") from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            raise unavailable(f"the {route.adapter.workload} workload is restarting", retry_after_s=2) from None

    def _openapi(self) -> dict:
        error = {"description": "A refusal", "content": {"application/json": {"schema": {
            "type": "object", "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
            "required": ["error", "detail"]}}}}
        paths = {"/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
                 "/info": {"get": {"summary": "Version, uptime, subnets, models and recent changes",
                                   "responses": {"200": {"description": "the miner's public facts"}}}}}
        for route in self.routes.values():
            paths[route.path] = {"post": {
                "summary": f"{route.adapter.workload} for subnet {route.subnet.netuid}",
                "parameters": [{"name": h, "in": "header", "required": True, "schema": {"type": "string"}}
                               for h in AUTH_HEADERS],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": route.adapter.request_model.model_json_schema()}}},
                "responses": {"200": {"description": "the result"},
                              **{str(code): error for code in (401, 403, 404, 413, 422, 503, 504)}},
            }}
        return {"openapi": "3.1.0", "info": {"title": "torchrank-miner", "version": __version__}, "paths": paths}
