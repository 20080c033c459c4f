"""The `Router` deployment: the subnet axon in front of the workloads.

The request path, in order; a request refused at any step stops there and never
reaches a workload:
  route (404) -> deadline from X-Bittensor-Timeout (422) -> body under the cap, at the minimum
  rate, among the body reads (413, 408) -> authorisation of the claimed hotkey from the subnet's
  metagraph (403) -> btauth/1 signature (401) -> shared replay check (401, 503)
  -> per-hotkey rate limit (429) -> schema and limits (422)
  -> circuit breaker (503) -> admission by stake (503 shed, 504) -> workload call under
  the deadline, once more on another replica if one died mid-call (503, 504) -> response.
"""

# No `from __future__ import annotations`: FastAPI must see real types through serve.ingress.
import asyncio
import logging
import random
import time
from dataclasses import dataclass

import ray
from fastapi import FastAPI, Request
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_app import __version__
from serve_app.chain.metagraph import MetagraphCache, make_source
from serve_app.config import MinerConfig, PROTOCOL_WORKLOAD, SubnetConfig
from serve_app.engines.coalesce import DeadlinePassed
from serve_app.errors import (ApiError, deadline_exceeded, error_response, json_response, not_found, retry_after, shed,
                              unavailable)
from serve_app.observability import logs
from serve_app.observability.info import BuildInfo
from serve_app.observability.metrics import GAUGE_PERIOD_S, MINER_FAILURES, RouterMetrics
from serve_app.ops.admission import Admission, QueueDeadline, Shed
from serve_app.ops.breaker import OPEN, STATE_VALUE, CircuitBreaker
from serve_app.ops.ratelimit import RateLimiter
from serve_app.ops.watchdog import SubnetWatchdog
from serve_app.protocols.base import Adapter
from serve_app.protocols.registry import make_adapter
from serve_app.router.auth import Authenticator, shared_nonce_store
from serve_app.router.body import BodyReads, check_content_type
from serve_app.router.policy import TIMEOUT_HEADER, authorise, caller_class, priority, request_timeout

log = logging.getLogger("ray.serve.torchrank.router")
WATCHDOG_PERIOD_S = 2.0
# The replay store: asked by the health check after this long without an answer; a replica
# whose store stays silent longer fails its health check.
STORE_QUIET_S = 5.0
STORE_UNREACHABLE_S = 30.0
# A claimed nonce may be taken over from a dead router this long past the longest deadline.
CLAIM_MARGIN_S = 5.0
READY_PROBE_TIMEOUT_S = 2.0
# A replica that died mid-call: try another this many times (idempotent workloads only).
DEAD_REPLICA_RETRIES = 2
RETRY_BACKOFF_S = 0.05  # doubled per attempt, with full jitter
# Workload errors that mean "this replica is gone", not "this request is bad".
REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

app = FastAPI(title="torchrank-miner", version=__version__, openapi_url=None, docs_url=None, redoc_url=None)

AUTH_HEADERS = ["X-Bittensor-Version", "X-Bittensor-Hotkey", "X-Bittensor-Nonce", "X-Bittensor-Signature"]


@dataclass(frozen=True)
class Route:
    path: str
    subnet: SubnetConfig
    metagraph: MetagraphCache
    adapter: Adapter
    workload: DeploymentHandle
    breaker: CircuitBreaker
    admission: Admission
    rate_limit: RateLimiter


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


def replica_actor_name() -> str:
    """This replica's actor name in Serve's namespace: how another replica asks Ray whether it lives."""
    try:
        return serve.get_replica_context().replica_id.to_full_id_str()
    except Exception:
        return "local"


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
        self.auth = Authenticator(cfg.wallet.hotkey_ss58(), shared_nonce_store(cfg.name), claimant=replica_actor_name(),
                                  find_store=lambda: shared_nonce_store(cfg.name))
        router = cfg.router
        self.body_reads = BodyReads(router.max_body_reads, router.max_body_bytes, router.body_timeout_s,
                                    router.body_grace_s, router.min_body_bytes_per_s)
        self.metagraphs: dict[int, MetagraphCache] = {}
        self.routes: dict[str, Route] = {}
        # Each workload's capacity is shared by every subnet using it: one admission per workload.
        self.admission = {name: Admission((wl := getattr(cfg.workloads, name)).admission, wl.in_flight_items)
                          for name in workloads}
        # Autoscaled workloads -> their min_replicas: the size their admission bounds are set for.
        self.autoscaled = {name: wl.autoscaling.min_replicas for name in workloads
                           if (wl := getattr(cfg.workloads, name)).autoscaling is not None}
        self.breakers: dict[tuple[int, str], CircuitBreaker] = {}
        self.watchdogs = {subnet.netuid: SubnetWatchdog(subnet) for subnet in cfg.subnets}
        self.workload_ready = {name: False for name in workloads}
        for subnet in cfg.subnets:
            cache = MetagraphCache(make_source(subnet.metagraph, subnet.netuid), subnet.metagraph.refresh_s,
                                   subnet.metagraph.max_age_s)
            await cache.refresh()  # a failed first read leaves requests at 503 until a refresh succeeds
            cache.start()
            self.metagraphs[subnet.netuid] = cache
            rate_limit = RateLimiter(subnet.rate_limit, replicas=cfg.router.num_replicas)
            for route in subnet.routes:
                workload = PROTOCOL_WORKLOAD[route.protocol]
                breaker = self.breakers.setdefault((subnet.netuid, workload), CircuitBreaker(subnet.breaker))
                self.routes[subnet.prefix + route.path] = Route(
                    path=subnet.prefix + route.path,
                    subnet=subnet,
                    metagraph=cache,
                    adapter=make_adapter(route.protocol, cfg, subnet),
                    workload=workloads[workload],
                    breaker=breaker,
                    admission=self.admission[workload],
                    rate_limit=rate_limit,
                )
        self.metrics = RouterMetrics()
        self.model_ids = ",".join(f"{name}={getattr(cfg.workloads, name).model}" for name in workloads)
        self.in_flight = {subnet.netuid: 0 for subnet in cfg.subnets}
        self.in_progress = 0  # all routes: the entry gate's count
        self._background = [asyncio.create_task(self._publish_gauges()), asyncio.create_task(self._watch()),
                            asyncio.create_task(logs.flush_every())]

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
                for (netuid, workload), breaker in self.breakers.items():
                    self.metrics.breaker_state.set(STATE_VALUE[breaker.state],
                                                   {"netuid": str(netuid), "workload": workload})
                for netuid, watchdog in self.watchdogs.items():
                    self.metrics.degraded.set(int(bool(watchdog.reasons)), {"netuid": str(netuid)})
                for workload, admission in self.admission.items():
                    self.metrics.admission_queue.set(len(admission.waiting), {"workload": workload})
            except Exception:  # the staleness alert depends on this loop: never let it die
                log.exception("publishing router gauges failed")
            await asyncio.sleep(GAUGE_PERIOD_S)

    def _running_replicas(self, names) -> dict[str, int]:
        """Running replicas of these workloads, from the Serve controller (blocking)."""
        deployments = serve.status().applications[serve.get_replica_context().app_name].deployments
        return {name: deployments[self.workloads[name].deployment_name].replica_states.get("RUNNING", 0)
                for name in names}

    async def _resize_admission(self) -> None:
        """Autoscaled workloads: admission bounds follow the running replicas (see Admission.resize)."""
        if self.autoscaled:
            running = await asyncio.to_thread(self._running_replicas, self.autoscaled)
            for name, count in running.items():
                if count:  # none running (restarting): keep the last bounds
                    self.admission[name].resize(count / self.autoscaled[name])

    async def _watch(self) -> None:
        """The per-subnet watchdog, the readiness probe of each workload, admission sizes."""
        while True:
            try:
                await self._resize_admission()
            except Exception:
                log.exception("reading the workloads' replica counts failed")
            try:
                for name in self.workloads:
                    self.workload_ready[name] = await self._answers(name)
                for netuid, watchdog in self.watchdogs.items():
                    before = watchdog.reasons
                    reasons = watchdog.verdict(self.metagraphs[netuid].age_s)
                    if reasons and reasons != before:
                        log.warning("subnet %d degraded: %s", netuid, "; ".join(reasons))
                    elif before and not reasons:
                        log.info("subnet %d healthy again", netuid)
            except Exception:
                log.exception("watchdog pass failed")
            # Until every workload has answered once, ask again soon: its info carries the speed
            # admission estimates with before it has measured its own.
            await asyncio.sleep(WATCHDOG_PERIOD_S if all(self.workload_ready.values()) else 0.2)

    async def _answers(self, name: str) -> bool:
        """The readiness probe: the workload's info(); its answer also fills the /info cache."""
        try:
            self.workload_info[name] = info = await asyncio.wait_for(self.workloads[name].info.remote(),
                                                                     READY_PROBE_TIMEOUT_S)
            self.admission[name].prior_rate = info.get("items_per_s_at_start")
            return True
        except Exception:
            return False

    async def check_health(self) -> None:
        """Serve's health check. The replay store is asked when it has been quiet a while; one that
        does not answer is looked up again (started anew if it is gone for good). The replica fails
        only when that too has failed for STORE_UNREACHABLE_S: a store that is merely slow must
        not get every router replaced at once."""
        if time.monotonic() - self.auth.store_answered_at < STORE_QUIET_S:
            return
        try:
            await asyncio.wait_for(self.auth.nonces.size.remote(), READY_PROBE_TIMEOUT_S)
            self.auth.store_answered_at = time.monotonic()
            return
        except Exception:
            silent_s = time.monotonic() - self.auth.store_answered_at
        try:
            await self.auth.find_store()
        except Exception:
            if silent_s > STORE_UNREACHABLE_S:
                raise RuntimeError(f"the shared replay store has not answered for {silent_s:.0f}s and cannot be "
                                   f"found or started again") from None

    @app.get("/health")
    def health(self):
        return {"status": "ok"}

    @app.get("/ready")
    def ready(self):
        """200 when every subnet can serve now: models loaded, metagraph fresh, breakers not open.
        Degradation (slow, failing) is reported in the body without failing readiness."""
        reasons, subnets = [], []
        for name, ok in self.workload_ready.items():
            if not ok:
                reasons.append(f"workload {name} is not answering")
        for subnet in self.cfg.subnets:
            age = self.metagraphs[subnet.netuid].age_s
            if age is None:
                reasons.append(f"subnet {subnet.netuid}: no metagraph loaded")
            elif age > subnet.watchdog.max_metagraph_age_s:
                reasons.append(f"subnet {subnet.netuid}: metagraph is {age:.0f}s old")
            breakers = {workload: breaker.snapshot() for (netuid, workload), breaker in self.breakers.items()
                        if netuid == subnet.netuid}
            reasons += [f"subnet {subnet.netuid}: {workload} breaker open ({b['reason']})"
                        for workload, b in breakers.items() if b["state"] == OPEN]
            subnets.append({"netuid": subnet.netuid, "metagraph_age_s": None if age is None else round(age, 1),
                            "breakers": {w: b["state"] for w, b in breakers.items()},
                            "degraded": self.watchdogs[subnet.netuid].reasons})
        body = {"status": "not_ready" if reasons else "ready", "reasons": reasons,
                "workloads": {n: "answering" if ok else "not_answering" for n, ok in self.workload_ready.items()},
                "subnets": subnets}
        return json_response(body, 503 if reasons else 200, retry_after(5) if reasons else None)

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
                "max_timeout_s": subnet.max_timeout_s,
                "breakers": {workload: breaker.snapshot() for (netuid, workload), breaker in self.breakers.items()
                             if netuid == subnet.netuid},
                "degraded": self.watchdogs[subnet.netuid].reasons,
            })
        return json_response({
            "version": build["version"],
            "git_sha": build["git_sha"],
            "started_at": build["started_at"],
            "uptime_s": build["uptime_s"],
            "hotkey": self.auth.self_hotkey_ss58,
            "subnets": subnets,
            "workloads": {name: {**await self._workload_info(name),
                                 "placement": getattr(self.cfg.workloads, name).placement_info()}
                          for name in self.workloads},
            "admission": {name: a.snapshot() for name, a in self.admission.items()},
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
        answered_nonce = None  # claimed in the replay store: settled once this request is answered
        if route is not None:
            self.in_flight[route.subnet.netuid] += 1  # published by _publish_gauges
        self.in_progress += 1
        try:
            if route is None:
                raise not_found(request.url.path)
            if request.method != "POST":
                raise ApiError(405, "method_not_allowed", f"{route.path} accepts POST", {"Allow": "POST"})
            if self.in_progress > self.cfg.router.max_in_progress:
                # Before any work on it (body, signature, replay store): past this point even
                # refusing costs CPU the admitted requests need.
                raise shed("the miner is at capacity", retry_after_s=1)
            check_content_type(request.headers.get("content-type"))
            timeout = request_timeout(request.headers, route.subnet)
            deadline = time.monotonic() + timeout
            claimed = request.headers.get("X-Bittensor-Hotkey", "")  # not verified yet: only used to refuse
            if route.admission.would_shed(priority(claimed, route.metagraph.view, route.subnet.auth), deadline):
                raise shed(f"the {route.adapter.workload} workload is at capacity", retry_after_s=1)
            body = await self.body_reads.read(request)
            view, policy = route.metagraph.view, route.subnet.auth
            if claimed:  # (none: verify refuses it, 401)
                # Before the signature and the replay store: a stranger's key costs neither.
                try:
                    authorise(claimed, view, policy)
                except ApiError:
                    who = caller_class(claimed, view, policy)
                    raise
            signed = self.auth.verify(request.headers, body, method=request.method, path=signed_target(request),
                                      policy=policy)
            caller = signed.hotkey  # the signature proves the caller holds it
            who = caller_class(caller, view, policy)
            if caller != claimed:
                authorise(caller, view, policy)
            await self.auth.claim(signed, max_open_s=route.subnet.max_timeout_s + CLAIM_MARGIN_S)
            answered_nonce = signed
            if route.subnet.rate_limit.enabled:
                wait = route.rate_limit.check(caller, view, allow_listed=caller in policy.allow_hotkeys)
                if wait is not None:
                    raise ApiError(429, "rate_limited", "this hotkey is over its request rate; see Retry-After",
                                   retry_after(min(wait, 3600)))
            parsed = route.adapter.parse(body)
            admitted = True
            result = await self._admit_and_call(route, parsed, priority(caller, view, policy), deadline, timeout)
            response = json_response(result, headers=headers)
            outcome, status = "ok", 200  # only once the answer is encoded
        except ApiError as err:
            outcome, status = err.code, err.status
            response = error_response(err, headers)
        except asyncio.CancelledError:
            # The caller went away (or Serve cancelled the request): not the miner's failure.
            outcome, status = "client_closed", 499
            raise
        except Exception:
            log.exception("request %s failed inside the miner", rid)
            response = error_response(ApiError(500, "internal_error", f"the miner failed this request (id {rid})"), headers)
        finally:
            if answered_nonce is not None:
                self.auth.settle(answered_nonce)
            seconds = time.perf_counter() - started
            self.in_progress -= 1
            if route is not None:
                self.in_flight[route.subnet.netuid] -= 1
                netuid, path_label, workload, slo_s = (str(route.subnet.netuid), route.path,
                                                       route.adapter.workload, route.subnet.slo.latency_s)
            else:
                netuid, path_label, workload, slo_s = "-", "unmatched", "-", None
            self.metrics.record(netuid, path_label, workload, outcome, who, seconds,
                                len(response.body) if response is not None else 0, admitted, slo_s)
            if admitted:
                self.watchdogs[route.subnet.netuid].observe(seconds, outcome in MINER_FAILURES)
            # Never the body, signature or headers: only who, where and how it ended.
            logs.request_line(netuid=netuid, caller=caller, caller_class=who, path=request.url.path,
                              status=status, outcome=outcome, admitted=admitted, ms=round(seconds * 1000, 2))
        return response

    async def _admit_and_call(self, route: Route, parsed, prio: float, deadline: float, timeout: float) -> dict:
        """Breaker, then a slot by stake, then the call; the breaker hears how the call went."""
        breaker, workload = route.breaker, route.adapter.workload
        if breaker.state == OPEN:  # fail fast, before queueing
            raise ApiError(503, "breaker_open", f"the {workload} workload is failing; refusing fast while it recovers",
                           retry_after(breaker.retry_after_s()))
        try:
            async with route.admission.slot(prio, deadline, route.adapter.cost(parsed)):
                if not breaker.allow():  # half-open and its probe is already out
                    raise ApiError(503, "breaker_open", f"the {workload} workload is being probed after failures",
                                   retry_after(1))
                verdict = True  # failed, unless shown otherwise
                try:
                    result = await self._call_workload(route, parsed, deadline, timeout)
                    verdict = False
                    return result
                except ApiError as err:
                    # No verdict for load (Serve's queue bound), nor for a deadline while the workload
                    # answers its readiness probe: whoever sends heavy work with short deadlines must not
                    # open the breaker for every validator. A deadline while it does not answer (its
                    # replicas gone) is its fault. One that hangs fails its health check (stuck_call_s)
                    # and Serve replaces it; one that is slow is shed by admission.
                    if err.code == "shed" or (err.code == "deadline_exceeded" and self.workload_ready[workload]):
                        verdict = None
                    raise
                except asyncio.CancelledError:  # the caller went away
                    verdict = None
                    raise
                finally:
                    if verdict is None:
                        breaker.abandon()
                    else:
                        breaker.record(verdict)
        except Shed as exc:
            raise shed(f"the {workload} workload is at capacity: {exc.reason}", retry_after_s=1) from None
        except QueueDeadline:
            raise deadline_exceeded(timeout) from None

    async def _call_workload(self, route: Route, parsed, deadline: float, timeout: float) -> dict:
        workload = route.adapter.workload
        for attempt in range(DEAD_REPLICA_RETRIES + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise deadline_exceeded(timeout)
            try:
                call = route.adapter.run(parsed, route.workload, time.time() + remaining, route.subnet.allow_degraded)
                return await asyncio.wait_for(call, remaining)
            except (asyncio.TimeoutError, DeadlinePassed):
                raise deadline_exceeded(timeout) from None
            except BackPressureError:
                raise shed(f"the {workload} workload's queue is full", retry_after_s=1) from None
            except REPLICA_GONE:
                if not route.adapter.idempotent or attempt == DEAD_REPLICA_RETRIES:
                    raise unavailable(f"the {workload} workload is restarting", retry_after_s=2) from None
                log.warning("a %s replica went away mid-call; trying another", workload)
                await asyncio.sleep(random.uniform(0, RETRY_BACKOFF_S * 2**attempt))
        raise AssertionError("unreachable")

    def _openapi(self) -> dict:
        error = {"description": "A refusal", "content": {"application/json": {"schema": {
            "type": "object", "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
            "required": ["error", "detail"]}}}}
        paths = {"/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
                 "/info": {"get": {"summary": "Version, uptime, subnets, models and recent changes",
                                   "responses": {"200": {"description": "the miner's public facts"}}}},
                 "/ready": {"get": {"summary": "Readiness: models answering, metagraph fresh, breakers not open",
                                    "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}}}
        for route in self.routes.values():
            paths[route.path] = {"post": {
                "summary": f"{route.adapter.workload} for subnet {route.subnet.netuid}",
                "parameters": [{"name": h, "in": "header", "required": True, "schema": {"type": "string"}}
                               for h in AUTH_HEADERS]
                              + [{"name": TIMEOUT_HEADER, "in": "header", "required": False,
                                  "description": "Seconds the caller will wait (default: the subnet's timeout_s)",
                                  "schema": {"type": "number", "exclusiveMinimum": 0}}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": route.adapter.request_model.model_json_schema()}}},
                "responses": {"200": {"description": "the result"},
                              **{str(code): error for code in (401, 403, 404, 408, 413, 415, 422, 429, 503, 504)}},
            }}
        return {"openapi": "3.1.0", "info": {"title": "torchrank-miner", "version": __version__}, "paths": paths}
