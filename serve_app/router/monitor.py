"""What a router replica knows about the miner beyond one request: whether each workload
answers (its readiness probe, whose answer is also the /info cache and admission's prior
speed), each subnet's watchdog, admission bounds that follow autoscaled replicas, and the
gauges. It also records how each request ended (metrics, watchdog, JSON log line)."""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from ray import serve

from serve_app.chain.standing import Standing, axon_matches, endpoint_text, standing
from serve_app.config import MinerConfig, SubnetConfig
from serve_app.economics.keeper import config_digest, ledger_keeper
from serve_app.economics.ledger import Tally
from serve_app.errors import MINER_FAILURES
from serve_app.observability import logs
from serve_app.observability.info import BuildInfo
from serve_app.observability.metrics import GAUGE_PERIOD_S, RouterMetrics
from serve_app.ops.breaker import STATE_VALUE
from serve_app.ops.periodic import every
from serve_app.ops.watchdog import SubnetWatchdog
from serve_app.router.pipeline import Ended
from serve_app.router.routes import RouteTable

log = logging.getLogger("ray.serve.torchrank.router")
WATCH_PERIOD_S = 2.0
WATCH_PERIOD_UNTIL_READY_S = 0.2
INFO_TIMEOUT_S = 2.0  # a workload's info(): the readiness probe, and the /info cache
LEDGER_TIMEOUT_S = 10.0  # handing the counts to the ledger keeper


class RouterMonitor:
    def __init__(self, cfg: MinerConfig, table: RouteTable, workloads: dict, build: BuildInfo, *, hotkey: str,
                 http_port: int, metrics: Optional[RouterMetrics] = None, rollouts: Optional[dict] = None,
                 keeper=None, app_name: str = ""):
        self.cfg = cfg
        self.hotkey = hotkey  # the miner's: whose standing the gauges and /info show
        self.http_port = http_port  # an endpoint's port when the config gives none
        self.table = table
        self.workloads = workloads  # name -> DeploymentHandle (the stable one, where a rollout runs)
        self.rollouts = rollouts or {}  # name -> RolloutRouter
        self.build = build
        self.metrics = metrics or RouterMetrics()
        self.watchdogs = {subnet.netuid: SubnetWatchdog(subnet) for subnet in cfg.subnets}
        self.workload_ready = {name: False for name in workloads}
        self.workload_info: dict[str, dict] = {}  # model identity does not change while a deployment lives
        # Autoscaled workloads -> their min_replicas: the size their admission bounds are set for.
        self.autoscaled = {name: scaling.min_replicas for name in workloads
                           if (scaling := getattr(cfg.workloads, name).placement.autoscaling) is not None}
        self.keeper = keeper  # the ledger's LedgerKeeper actor (serve_app/economics/keeper.py); None: found later
        self.app_name = app_name  # the Serve application: whose replicas the keeper counts
        self.cfg_digest = config_digest(cfg)
        self.tally = Tally()  # counts since the last hand-over to the keeper
        self.model_ids = ",".join(f"{name}={getattr(cfg.workloads, name).model.id}" for name in workloads)
        self._tasks: list[asyncio.Task] = []

    def start(self, in_flight: dict[int, int]) -> None:
        """The background loops; `in_flight`: the pipeline's per-subnet count, for its gauge."""
        self._tasks = [asyncio.create_task(every(GAUGE_PERIOD_S, lambda: self.publish_gauges(in_flight),
                                                 "publishing router gauges")),
                       asyncio.create_task(every(WATCH_PERIOD_S, self.resize_admission,
                                                 "reading the workloads' replica counts")),
                       asyncio.create_task(every(self._watch_period, self.watch, "the watchdog pass")),
                       asyncio.create_task(logs.flush_every())]
        if self.app_name:  # a Serve application: it has a ledger
            self._tasks.append(asyncio.create_task(every(self.cfg.ledger.flush_s, self.flush_ledger,
                                                         "handing the counts to the ledger", wait_first=True)))

    def _watch_period(self) -> float:
        # Until every workload has answered once, probe again soon: its info carries the speed
        # admission estimates with before it has measured its own.
        return WATCH_PERIOD_S if all(self.workload_ready.values()) else WATCH_PERIOD_UNTIL_READY_S

    def record(self, ended: Ended) -> None:
        route = ended.route
        if route is not None:
            netuid, path, workload, slo_s = (str(route.subnet.netuid), route.path, route.adapter.workload,
                                             route.subnet.slo.latency_s)
        else:
            netuid, path, workload, slo_s = "-", "unmatched", "-", None
        self.metrics.record(netuid, path, workload, ended.outcome, ended.who, ended.seconds, ended.response_bytes,
                            ended.admitted, slo_s)
        if route is not None:
            self.tally.record(route.subnet.netuid, workload, ended.outcome, ended.admitted, ended.seconds,
                              ended.response_bytes, slo_s)
        if ended.admitted:
            self.watchdogs[route.subnet.netuid].observe(ended.seconds, ended.outcome in MINER_FAILURES)
        logs.request_line(netuid=netuid, caller=ended.caller, caller_class=ended.who, path=ended.path,
                          status=ended.status, outcome=ended.outcome, admitted=ended.admitted,
                          ms=round(ended.seconds * 1000, 2))

    def record_edge(self, path: str, reason: str, count: int) -> None:
        """`count` requests HAProxy refused (`reason`) before they reached a router: on a route of this
        app (its metrics and the ledger's refusals), or on no route ("-")."""
        route = self.table.routes.get(path)
        netuid, label = (str(route.subnet.netuid), path) if route is not None else ("-", "unmatched")
        self.metrics.edge_refused.inc(count, tags={"netuid": netuid, "route": label, "reason": reason})
        if route is not None:
            self.tally.refused_at_edge(route.subnet.netuid, route.adapter.workload, reason, count)

    async def flush_ledger(self) -> None:
        """The counts since the last time, the miner's standing and what serves, to the ledger keeper
        (found or created first if need be). The rows are kept for the next time when the keeper
        surely did not take them; after a timeout it may have, so they are dropped rather than
        counted twice. The ledger is best-effort: the requests never wait for it."""
        if self.keeper is None:
            self.keeper = await asyncio.wait_for(asyncio.to_thread(ledger_keeper, self.cfg, self.app_name),
                                                 LEDGER_TIMEOUT_S)
            await asyncio.wait_for(self.keeper.configure.remote(self.cfg, self.app_name), LEDGER_TIMEOUT_S)
        rows = self.tally.take()
        standing = {}
        for subnet in self.cfg.subnets:
            if self.table.metagraphs[subnet.netuid].view is not None:  # None: no longer registered
                own = self.standing(subnet)
                standing[subnet.netuid] = None if own is None else {"incentive": own.incentive,
                                                                    "tao_per_day": own.tao_per_day}
        digests = {name: (info.get("weights_sha256") or "")[:12] for name, info in self.workload_info.items()}
        sha = self.build.git_sha
        version = f"{self.build.version} {sha[:12]}{'-dirty' if sha.endswith('-dirty') else ''}"
        try:
            answer = await asyncio.wait_for(self.keeper.add.remote(rows, standing, [version], digests,
                                                                   self.cfg_digest), LEDGER_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("the ledger keeper did not answer in %.0f s: %d rows of counts dropped", LEDGER_TIMEOUT_S,
                        len(rows))
            return
        except Exception:
            self.tally.give_back(rows)  # the actor is gone or restarting: the call did not run
            self.keeper = None  # found (or started) again next time
            raise
        if answer == "reconfigure":  # Ray restarted it with its first config
            await asyncio.wait_for(self.keeper.configure.remote(self.cfg, self.app_name), LEDGER_TIMEOUT_S)
        if answer != "stored":
            self.tally.give_back(rows)

    def publish_gauges(self, in_flight: dict[int, int]) -> None:
        # Ray exports a gauge value only for a while after it is set: publish them all again each period.
        m = self.metrics
        m.flush()
        m.publish_slos(self.cfg.subnets)
        m.build.set(1, {"version": self.build.version, "git_sha": self.build.git_sha, "models": self.model_ids})
        for netuid, count in in_flight.items():
            m.in_flight.set(count, {"netuid": str(netuid)})
        for netuid, cache in self.table.metagraphs.items():
            if cache.view is not None:  # absent, not zero, until the first read
                m.metagraph_age.set(cache.age_s, {"netuid": str(netuid)})
                m.metagraph_block.set(cache.view.block, {"netuid": str(netuid)})
        for subnet in self.cfg.subnets:
            self.publish_standing(subnet)
        for (netuid, workload), breaker in self.table.breakers.items():
            m.breaker_state.set(STATE_VALUE[breaker.state], {"netuid": str(netuid), "workload": workload})
        for netuid, watchdog in self.watchdogs.items():
            m.degraded.set(int(bool(watchdog.reasons)), {"netuid": str(netuid)})
        for workload, admission in self.table.admission.items():
            m.admission_queue.set(len(admission.waiting), {"workload": workload})

    def standing(self, subnet: SubnetConfig) -> Optional[Standing]:
        view = self.table.metagraphs[subnet.netuid].view
        return None if view is None else standing(view, self.hotkey)

    def endpoint(self, subnet: SubnetConfig) -> Optional[str]:
        """The configured public endpoint, as the chain writes an axon; None when not configured."""
        if subnet.endpoint is None:
            return None
        return endpoint_text(subnet.endpoint.ip, subnet.endpoint.port or self.http_port)

    def axon(self, subnet: SubnetConfig, own: Optional[Standing] = None) -> dict:
        """For /info: the configured endpoint, the chain's axon, and whether they match (None: cannot tell).
        `own`: the subnet's standing when the caller has just computed it."""
        own, endpoint = own or self.standing(subnet), self.endpoint(subnet)
        on_chain = own.axon if own is not None else None
        known = endpoint is not None and self.table.metagraphs[subnet.netuid].view is not None
        return {"endpoint": endpoint, "on_chain": on_chain,
                "matches": axon_matches(on_chain, subnet.endpoint.ip, subnet.endpoint.port or self.http_port)
                if known else None}

    def publish_standing(self, subnet: SubnetConfig) -> None:
        """Absent until the first metagraph read; after it, `registered` 0 once the hotkey is gone."""
        if self.table.metagraphs[subnet.netuid].view is None:
            return
        m, tags, own = self.metrics, {"netuid": str(subnet.netuid)}, self.standing(subnet)
        m.registered.set(int(own is not None), tags)
        if own is not None:
            for name, gauge in m.standing.items():
                if (value := getattr(own, name)) is not None:
                    gauge.set(value, tags)
        axon = self.axon(subnet, own)
        if axon["matches"] is not None:
            m.axon_matches.set(int(axon["matches"]), tags)

    def _running_replicas(self, names) -> dict[str, int]:
        """Running replicas of these workloads, from the Serve controller (blocking)."""
        deployments = serve.status().applications[serve.get_replica_context().app_name].deployments
        return {name: deployments[self.serving(name).deployment_name].replica_states.get("RUNNING", 0)
                for name in names}

    async def resize_admission(self) -> None:
        """Autoscaled workloads: admission bounds follow the running replicas (see Admission.resize)."""
        if self.autoscaled:
            running = await asyncio.to_thread(self._running_replicas, self.autoscaled)
            for name, count in running.items():
                if count:  # none running (restarting): keep the last bounds
                    self.table.admission[name].resize(count / self.autoscaled[name])

    def serving(self, name: str):
        """The deployment that serves the workload now: after a promotion, the candidate's."""
        rollout = self.rollouts.get(name)
        return rollout.serving if rollout is not None else self.workloads[name]

    async def watch(self) -> None:
        """The readiness probe of each workload, then each subnet's watchdog verdict."""
        for name in self.workloads:
            self.workload_ready[name] = await self.fetch_info(name) is not None
        if "embeddings" in self.workloads and self.cfg.workloads.agents is not None:
            await self.read_outside_work()
        for rollout in self.rollouts.values():
            await rollout.read_digests(INFO_TIMEOUT_S)
        for netuid, watchdog in self.watchdogs.items():
            before = watchdog.reasons
            reasons = watchdog.verdict(self.table.metagraphs[netuid].age_s)
            if reasons and reasons != before:
                log.warning("subnet %d degraded: %s", netuid, "; ".join(reasons))
            elif before and not reasons:
                log.info("subnet %d healthy again", netuid)

    async def read_outside_work(self) -> None:
        """The embeddings' texts in flight for the agents' retrieve tool, which no router admits:
        admission counts them ahead of every newcomer. One replica's figure, times the running
        replicas' scale (an estimate with several replicas); kept when it does not answer."""
        try:
            texts = await asyncio.wait_for(self.serving("embeddings").outside_work.remote(), INFO_TIMEOUT_S)
        except Exception:
            return
        admission = self.table.admission["embeddings"]
        admission.outside_work = float(texts) * admission.scale

    async def fetch_info(self, name: str) -> Optional[dict]:
        """The workload's info() (None if it does not answer in time), kept for /info and for
        admission's speed before it has measured its own."""
        try:
            handle = self.serving(name)
            info = await asyncio.wait_for(handle.info.remote(), INFO_TIMEOUT_S)
        except Exception:
            return None
        self.workload_info[name] = info
        self.table.admission[name].prior_rate = info.get("items_per_s_at_start")
        return info

    async def info_of(self, name: str) -> dict:
        """For /info: the kept answer, else one asked now; with the rollout, if one runs."""
        info = self.workload_info.get(name) or await self.fetch_info(name) or {"status": "unavailable"}
        rollout = self.rollouts.get(name)
        return info if rollout is None else {**info, "rollout": rollout.info()}
