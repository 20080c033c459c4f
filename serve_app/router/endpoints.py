"""The router's own documents: `/ready` (may this miner serve now?), `/info` (transparency
for validators: version, uptime, subnets, models, recent changes; no secrets), `/` (the same
as a small HTML page, with the last 14 days' availability from the ledger) and the OpenAPI
description of the routes, with every refusal from the error catalogue."""

from __future__ import annotations

import asyncio
import time

from serve_app import __version__
from serve_app.errors import ErrorCode
from serve_app.ops.breaker import OPEN
from serve_app.router.auth import SCHEME_HEADERS
from serve_app.router.monitor import RouterMonitor
from serve_app.router.policy import TIMEOUT_HEADER


def _age(cache) -> float | None:
    return None if cache.age_s is None else round(cache.age_s, 1)


def readiness(monitor: RouterMonitor) -> tuple[dict, bool]:
    """(body, ready): ready when every subnet can serve now: models answering, metagraph fresh,
    breakers not open. Degradation (slow, failing) is reported without failing readiness."""
    reasons = [f"workload {name} is not answering" for name, ok in monitor.workload_ready.items() if not ok]
    subnets = []
    for subnet in monitor.cfg.subnets:
        age = monitor.table.metagraphs[subnet.netuid].age_s
        if age is None:
            reasons.append(f"subnet {subnet.netuid}: no metagraph loaded")
        elif age > subnet.watchdog.max_metagraph_age_s:
            reasons.append(f"subnet {subnet.netuid}: metagraph is {age:.0f}s old")
        breakers = {w: b.snapshot() for w, b in monitor.table.subnet_breakers(subnet.netuid).items()}
        reasons += [f"subnet {subnet.netuid}: {workload} breaker open ({b['reason']})"
                    for workload, b in breakers.items() if b["state"] == OPEN]
        subnets.append({"netuid": subnet.netuid, "metagraph_age_s": _age(monitor.table.metagraphs[subnet.netuid]),
                        "breakers": {w: b["state"] for w, b in breakers.items()},
                        "degraded": monitor.watchdogs[subnet.netuid].reasons})
    body = {"status": "not_ready" if reasons else "ready", "reasons": reasons,
            "workloads": {n: "answering" if ok else "not_answering" for n, ok in monitor.workload_ready.items()},
            "subnets": subnets}
    return body, not reasons


async def info(monitor: RouterMonitor, hotkey: str, edge=None) -> dict:
    build = monitor.build.as_dict()
    subnets = []
    for subnet in monitor.cfg.subnets:
        cache = monitor.table.metagraphs[subnet.netuid]
        subnets.append({
            "netuid": subnet.netuid,
            "routes": [subnet.prefix + route.path for route in subnet.routes],
            "metagraph": {"source": subnet.metagraph.source,
                          "block": cache.view.block if cache.view is not None else None,
                          "age_s": _age(cache)},
            "auth_scheme": subnet.auth.scheme,
            "standing": own.as_dict() if (own := monitor.standing(subnet)) is not None else None,
            "axon": monitor.axon(subnet, own),
            "timeout_s": subnet.timeout_s,
            "max_timeout_s": subnet.max_timeout_s,
            "breakers": {w: b.snapshot() for w, b in monitor.table.subnet_breakers(subnet.netuid).items()},
            "degraded": monitor.watchdogs[subnet.netuid].reasons,
        })
    return {
        "version": build["version"],
        "git_sha": build["git_sha"],
        "started_at": build["started_at"],
        "uptime_s": build["uptime_s"],
        "hotkey": hotkey,
        "subnets": subnets,
        "workloads": {name: {**await monitor.info_of(name),
                             "placement": getattr(monitor.cfg.workloads, name).placement.info()}
                      for name in monitor.workloads},
        "admission": {name: a.snapshot() for name, a in monitor.table.admission.items()},
        "edge": edge.describe() if edge is not None else {"enabled": False},
        "changes": build["changes"],
    }


INFO_TTL_S = 1.0  # /info is built at most this often per router, whoever asks


class Cached:
    """An async builder's result (/info's bytes, the public page), kept for `ttl_s`: a stranger asking
    again and again costs one build a period (concurrent askers share it)."""

    def __init__(self, build, ttl_s: float):
        self.build, self.ttl_s = build, ttl_s
        self.value, self.at = b"", -ttl_s
        self.lock = asyncio.Lock()

    async def get(self):
        async with self.lock:
            if time.monotonic() - self.at >= self.ttl_s:
                self.value = await self.build()
                self.at = time.monotonic()
            return self.value


PAGE_TTL_S = 30.0  # the public page is rendered at most this often, whoever asks
PAGE_DAYS = 14


class PublicPage:
    """`GET /`: rendered from /info's public facts and the keeper's last days, then kept for
    PAGE_TTL_S, so a stranger reloading it costs the miner nothing. Without the keeper (restarting)
    the page says the availability is unavailable."""

    def __init__(self, monitor: RouterMonitor, hotkey: str):
        self.monitor, self.hotkey = monitor, hotkey
        self.cache = Cached(self._render, PAGE_TTL_S)

    async def _availability(self):
        keeper = self.monitor.keeper  # None until the router has found it
        if keeper is None:
            return None
        try:
            return await asyncio.wait_for(keeper.public_days.remote(PAGE_DAYS), 2.0)
        except Exception:
            return None

    async def get(self) -> str:
        return await self.cache.get()

    async def _render(self) -> str:
        from serve_app.economics.page import render_page

        build, m = self.monitor.build.as_dict(), self.monitor
        models = {name: {"model": info.get("model"), "weights_sha256": info.get("weights_sha256")}
                  for name in m.workloads if (info := m.workload_info.get(name))}
        return render_page({
            "name": m.cfg.name, "version": build["version"], "git_sha": build["git_sha"],
            "started_at": build["started_at"], "uptime_s": build["uptime_s"], "hotkey": self.hotkey,
            "changes": build["changes"], "models": models,
            "subnets": [{"netuid": s.netuid, "routes": [s.prefix + r.path for r in s.routes]} for s in m.cfg.subnets],
            "availability": await self._availability()})


# Refusals a route can answer (the router's own endpoints answer neither these nor 499).
ROUTE_REFUSALS = [code for code in ErrorCode if code is not ErrorCode.client_closed]


def openapi(routes) -> dict:
    def refusal(status: int) -> dict:
        codes = [c for c in ROUTE_REFUSALS if c.status == status]
        return {"description": "; ".join(f"`{c.value}`: {c.meaning}" for c in codes),
                "content": {"application/json": {"schema": {
                    "type": "object",
                    "properties": {"error": {"type": "string", "enum": [c.value for c in codes]},
                                   "detail": {"type": "string"}},
                    "required": ["error", "detail"]}}}}

    paths = {"/": {"get": {"summary": "The public page: uptime, version, changes, models, subnets, 14 days' "
                                      "availability", "responses": {"200": {"description": "an HTML page"}}}},
             "/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
             "/info": {"get": {"summary": "Version, uptime, subnets, models and recent changes",
                               "responses": {"200": {"description": "the miner's public facts"}}}},
             "/ready": {"get": {"summary": "Readiness: models answering, metagraph fresh, breakers not open",
                                "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}}}
    statuses = sorted({c.status for c in ROUTE_REFUSALS})
    for route in routes.values():
        paths[route.path] = {"post": {
            "summary": f"{route.adapter.workload} for subnet {route.subnet.netuid}",
            "parameters": [{"name": h, "in": "header", "required": True, "schema": {"type": "string"}}
                           for h in SCHEME_HEADERS[route.subnet.auth.scheme][1]]
                          + [{"name": TIMEOUT_HEADER, "in": "header", "required": False,
                              "description": "Seconds the caller will wait (default: the subnet's timeout_s)",
                              "schema": {"type": "number", "exclusiveMinimum": 0}}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": route.adapter.request_model.model_json_schema()}}},
            "responses": {"200": {"description": "the result"}, **{str(s): refusal(s) for s in statuses}},
        }}
    return {"openapi": "3.1.0", "info": {"title": "torchrank-miner", "version": __version__}, "paths": paths}
