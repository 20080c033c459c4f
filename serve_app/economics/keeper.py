"""The ledger's one writer: a Ray actor per miner, on the head node.

Router replicas hand it their counts every `ledger.flush_s` (Tally rows), the miner's own
standing and what serves (versions, weights digests). By itself it reads, every few seconds,
what each deployment holds from the Serve controller (RUNNING replicas x their CPU/GPU
shares: what the autoscaler decided), which is the cost side and the uptime, and exports
the economics gauges the Prometheus rules price (monitoring/rules/economics.yml).

Detached, like the rollout coordinator: it outlives router replicas; Ray restarts it if it
dies (its state is the SQLite file).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Optional

import ray

from serve_app.config import CANDIDATE_SUFFIX, MinerConfig
from serve_app.economics.ledger import Clock, Ledger, LedgerError
from serve_app.economics.money import ROUTER, cost_per_hour, subnet_workloads

log = logging.getLogger("ray.serve.torchrank.ledger")
SAMPLE_S = 5.0
GONE_S = 60.0  # the application deleted this long: the keeper ends (a redeploy starts one again)
DEPLOYMENTS = {"Router": ROUTER, "Embeddings": "embeddings", "Diffusion": "diffusion", "Agents": "agents"}


def shares(cfg: MinerConfig) -> dict[str, tuple[str, float, float]]:
    """Deployment name -> (workload, CPUs, GPUs) one replica holds."""
    out = {"Router": (ROUTER, cfg.router.num_cpus, 0.0)}
    for deployment, name in DEPLOYMENTS.items():
        wl = getattr(cfg.workloads, name, None) if name != ROUTER else None
        if wl is None:
            continue
        out[deployment] = (name, wl.placement.num_cpus, wl.placement.num_gpus)
        if wl.canary is not None:
            placement = wl.canary.placement or wl.placement
            out[deployment + CANDIDATE_SUFFIX] = (name, placement.num_cpus, placement.num_gpus)
    return out


def held_now(app: Optional[dict], cfg: MinerConfig) -> tuple[dict[str, tuple[float, float, float]], bool]:
    """(workload -> (CPUs, GPUs, replicas) held by RUNNING replicas, up: the router and every
    stable workload have one) from `app`: deployment name -> RUNNING replicas (None: no app)."""
    held: dict[str, list[float]] = {}
    for deployment, (workload, cpus, gpus) in shares(cfg).items():
        running = app.get(deployment, 0) if app is not None else 0  # no app: nothing held
        h = held.setdefault(workload, [0.0, 0.0, 0.0])
        h[0] += running * cpus
        h[1] += running * gpus
        h[2] += running
    stable = [d for d in shares(cfg) if not d.endswith(CANDIDATE_SUFFIX)]
    return {w: tuple(h) for w, h in held.items()}, app is not None and all(app.get(d, 0) for d in stable)


def running_replicas(app_name: str) -> Optional[dict[str, int]]:
    """deployment -> RUNNING replicas of the application, from the Serve controller; None when it is not deployed."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return None
    return {name: d.replica_states.get("RUNNING", 0) for name, d in app.deployments.items()}


class Gauges:
    """The keeper's metrics. What was held is counted (unit-seconds, currency) on the same samples
    the ledger adds, so the Prometheus rules' increase() over any window is the ledger's figure,
    downtime included (nothing held, nothing counted)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge

        self.held = Gauge("torchrank_resources_held", "CPU or GPU units held by RUNNING replicas now.",
                          tag_keys=("workload", "resource"))
        self.held_seconds = Counter("torchrank_held_unit_seconds", "CPU or GPU unit-seconds held by RUNNING "
                                                                   "replicas.", tag_keys=("workload", "resource"))
        self.held_cost = Counter("torchrank_held_cost", "Currency the workload's RUNNING replicas cost (power "
                                                        "included, ops not).", tag_keys=("workload",))
        self.ops = Gauge("torchrank_ops_cost_per_hour", "economics.ops_per_month / 730.")
        self.egress = Gauge("torchrank_egress_price_per_gb", "Currency per GB of response bytes.")
        self.tao = Gauge("torchrank_tao_price", "Currency per TAO (economics.tao_price).")
        self.reward = Gauge("torchrank_reward_per_task", "Currency per accepted task (a fixed reward).",
                            tag_keys=("netuid",))
        self.from_chain = Gauge("torchrank_reward_from_chain", "1 for a subnet whose revenue is its chain emission.",
                                tag_keys=("netuid",))
        self.routes = Gauge("torchrank_subnet_routes", "1 for each workload a subnet routes to.",
                            tag_keys=("netuid", "workload"))

    def publish(self, cfg: MinerConfig, held: dict) -> None:
        for netuid, workloads in subnet_workloads(cfg).items():
            for workload in workloads | {ROUTER}:
                self.routes.set(1, {"netuid": str(netuid), "workload": workload})
        for workload, (cpu, gpu, _) in held.items():
            self.held.set(cpu, {"workload": workload, "resource": "cpu"})
            self.held.set(gpu, {"workload": workload, "resource": "gpu"})
        econ = cfg.economics
        if econ is None:
            return
        self.ops.set(econ.ops_per_month / 730.0)
        self.egress.set(econ.egress_per_gb)
        self.tao.set(econ.tao_price)
        for subnet in cfg.subnets:
            tags = {"netuid": str(subnet.netuid)}
            self.from_chain.set(int(subnet.reward.source == "chain"), tags)
            if subnet.reward.source == "fixed":
                self.reward.set(subnet.reward.per_task_tao * econ.tao_price, tags)


    def count(self, cfg: MinerConfig, held: dict, seconds: float) -> None:
        """What was held for the last `seconds` (real time: Prometheus's clock)."""
        for workload, (cpu, gpu, _) in held.items():
            for resource, units in (("cpu", cpu), ("gpu", gpu)):
                if units * seconds > 0:  # Ray's counters refuse 0
                    self.held_seconds.inc(units * seconds, {"workload": workload, "resource": resource})
            if cfg.economics is not None and (cost := cost_per_hour(cfg.economics, workload, cpu, gpu)) > 0:
                self.held_cost.inc(cost * seconds / 3600, {"workload": workload})


def config_digest(cfg: MinerConfig) -> str:
    """Which config a keeper runs: the routers send it with their counts, so a keeper Ray restarted
    with its first config (an actor's constructor arguments) is told the current one."""
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class LedgerKeeper:
    """Never fails to start: a ledger file that cannot be opened (a read-only directory, a full
    disk) is logged and tried again, and the miner serves meanwhile (the routers hand their counts
    on when it can take them)."""

    def __init__(self, cfg: MinerConfig, app_name: str):
        self.lock = threading.RLock()  # the sampler thread and the routers' calls share the file
        self.cfg = cfg
        self.digest = config_digest(cfg)
        self.app_name = app_name  # the Serve application: whose replicas it counts
        self.ledger: Optional[Ledger] = None
        self.standing: dict[int, Optional[dict]] = {}  # the latest a router reported, per subnet
        self.gauges = Gauges()
        self._last: Optional[float] = None  # when the sampler last counted
        self._gone_since: Optional[float] = None  # when the application was last seen missing
        self._open()
        threading.Thread(target=self._sample_forever, name="ledger-sampler", daemon=True).start()

    def _open(self) -> bool:
        if self.ledger is None:
            try:
                self.ledger = Ledger(self.cfg.ledger.path, Clock.of(self.cfg.ledger), self.cfg.ledger.keep_days)
            except LedgerError as exc:
                log.warning("%s; the miner serves on, the ledger is tried again in %.0f s", exc, self.period())
        return self.ledger is not None

    def period(self) -> float:
        """Seconds between samples: at most a hundredth of a ledger day, so compressed days are sampled too."""
        return min(SAMPLE_S, self.cfg.ledger.day_s / 100)

    def configure(self, cfg: MinerConfig, app_name: str) -> None:
        """The routers' config (a redeploy may change prices or the ledger's file)."""
        with self.lock:
            self.app_name = app_name
            if config_digest(cfg) == self.digest and self.ledger is not None:
                return
            old = self.ledger
            self.cfg, self.digest, self.ledger, self._last = cfg, config_digest(cfg), None, None
            if old is not None:
                old.close()
            self._open()

    def add(self, rows: list[dict], standing: dict[int, Optional[dict]], versions: list[str],
            digests: dict[str, str], digest: str) -> str:
        """A router's counts since its last call. "stored"; "reconfigure" when the router runs another
        config (it then calls configure and hands the rows on again); "unavailable" without a ledger."""
        with self.lock:
            if digest != self.digest:
                return "reconfigure"
            self.standing.update(standing)
            if not self._open():
                return "unavailable"
            self.ledger.add_usage(rows)
            self.ledger.add_build(versions, digests)
            return "stored"

    def public_days(self, last: int) -> Optional[dict[str, list[dict]]]:
        """netuid -> the last days' availability and uptime: what the public page shows."""
        with self.lock:
            if not self._open():
                return None
            days = self.ledger.days(self.cfg, last=last)
        return {str(netuid): [{"label": d["label"], "availability": d["availability"], "uptime": d["uptime"],
                               "partial": d["partial"]} for d in rows] for netuid, rows in days.items()}

    def _sample_forever(self) -> None:
        last_prune = 0.0
        while True:
            time.sleep(self.period())
            try:
                self._sample()
                if time.monotonic() - last_prune > 600:
                    with self.lock:
                        if self._open():
                            self.ledger.prune()
                    last_prune = time.monotonic()
            except Exception as exc:  # the controller restarting, a full disk: try again next time
                log.warning("ledger sample failed: %s: %s", type(exc).__name__, exc)

    def _sample(self) -> None:
        with self.lock:
            cfg, app_name = self.cfg, self.app_name
        app = running_replicas(app_name)
        if app is None:
            self._gone_since = self._gone_since or time.monotonic()
            if time.monotonic() - self._gone_since > GONE_S:
                # No miner to count: stop polling the controller. Killed, not exited, so Ray does not restart it.
                log.info("application %s deleted %.0f s ago: the ledger keeper ends", app_name, GONE_S)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        else:
            self._gone_since = None
        held, up = held_now(app, cfg)
        self.gauges.publish(cfg, held)
        now = time.monotonic()
        with self.lock:
            # A gap (the keeper restarting, a stall) is not counted: at most 3 periods per sample.
            elapsed = 0.0 if self._last is None else min(now - self._last, 3 * self.period())
            self._last = now
            if not elapsed or cfg is not self.cfg or not self._open():
                return
            self.ledger.add_held(held, elapsed, up=up)
            self.gauges.count(cfg, held, elapsed)
            if up:
                served = {sub.netuid for sub in cfg.subnets}
                self.ledger.add_standing({n: s for n, s in self.standing.items() if n in served and s is not None},
                                         elapsed)


def ledger_keeper(cfg: MinerConfig, app_name: str = "", create: bool = True):
    """The miner's keeper (blocking), counting the replicas of Serve application `app_name`;
    None when `create` is False and none runs."""
    name = f"{cfg.name}-ledger"
    if not create:
        try:
            return ray.get_actor(name, namespace="torchrank")
        except ValueError:
            return None
    return LedgerKeeper.options(name=name, namespace="torchrank", get_if_exists=True, lifetime="detached",
                                resources={"node:__internal_head__": 0.001}).remote(cfg, app_name)
