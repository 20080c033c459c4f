"""Rollouts in the router: which side serves a validator, the mirrored calls whose answers are
compared, and the one coordinator that decides for every router replica.

Each workload with a `canary` has two deployments, stable and candidate (serve_app/app.py).
A `RolloutRouter` per workload in each router replica:
- picks the side for a request from the shared state: stable in shadow and after a rollback,
  the candidate after a promotion, and in canary the candidate for validators whose hotkey
  falls under the current weight (sticky, serve_app/ops/rollout.py);
- gives the candidate the time left minus what stable needs after it (1.5 x stable's recent
  p95); a request the candidate fails or does not answer in that time is served by stable
  with the rest, so a failing candidate costs validators nothing;
- mirrors `shadow_share` of requests to the other side, with the validator's whole timeout,
  never waiting for it and never more than `max_shadow_in_flight` at once, and compares the
  two answers off the event loop (the adapter's `agreement`);
- reports what it saw to the miner's `RolloutCoordinator` actor every SYNC_S and takes back
  the state. Once decided, the one router whose claim the coordinator grants logs the
  decision (one JSON line) and, after the longest deadline, retires the losing side.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import random
import time
from collections import deque
from typing import Awaitable, Callable, Optional

import ray

from serve_app.config import CanaryConfig
from serve_app.errors import ApiError, ErrorCode
from serve_app.ops.rollout import (CANARY, CANDIDATE, PROMOTED, ROLLED_BACK, SHADOW, STABLE, STATES, Observation,
                                   Rollout, on_candidate, p95)
from serve_app.router.auth import HEAD_NODE_RESOURCE

log = logging.getLogger("ray.serve.torchrank.rollout")
SYNC_S = 0.5
COORDINATOR_TIMEOUT_S = 2.0
CANDIDATE_TIME_SHARE = 0.5  # of the time left: the candidate's, before stable takes over
# Not the candidate's fault: the caller's or load's (a mirrored call refused for load is not counted).
NOT_COUNTED = {ErrorCode.shed, ErrorCode.client_closed}

Call = Callable[[object, float], Awaitable[dict]]  # (deployment handle, monotonic deadline) -> answer


class RolloutBook:
    """Every rollout of the miner, one per workload: the state inside the RolloutCoordinator actor.

    `store_key`: where in Ray's GCS key-value store the book is saved at each stage change and
    decision, so a coordinator that Ray restarts keeps its decisions (a promoted candidate stays
    promoted: its old stable has freed its model)."""

    def __init__(self, store_key: Optional[str] = None) -> None:
        self.store_key = store_key
        self.rollouts: dict[str, tuple[str, Rollout]] = {}
        if store_key is not None:
            from ray.experimental.internal_kv import _internal_kv_get

            saved = _internal_kv_get(store_key, namespace="torchrank")
            if saved:
                self.rollouts = pickle.loads(saved)

    def _save(self) -> None:
        if self.store_key is not None:
            from ray.experimental.internal_kv import _internal_kv_put

            _internal_kv_put(self.store_key, pickle.dumps(self.rollouts), overwrite=True, namespace="torchrank")

    @staticmethod
    def key(canary_json: str, stable_model: str, candidate_model: str) -> str:
        return f"{canary_json}|{stable_model}|{candidate_model}"

    def begin(self, workload: str, canary_json: str, stable_model: str, candidate_model: str) -> dict:
        """The rollout of this candidate over this stable, begun now unless it is already known."""
        key = self.key(canary_json, stable_model, candidate_model)
        known = self.rollouts.get(workload)
        if known is None or known[0] != key:
            canary = CanaryConfig.model_validate_json(canary_json)
            self.rollouts[workload] = (key, Rollout(workload, canary, stable_model, candidate_model))
            self._save()
        return self.rollouts[workload][1].as_dict()

    def report(self, workload: str, key: str, observations: list[Observation],
               served: dict[str, int]) -> Optional[dict]:
        """The state after a router's observations. KeyError for a rollout not begun (the router
        begins it again); None for a router of another rollout (one still on an old config
        during a rolling restart), whose observations are not this rollout's."""
        known_key, rollout = self.rollouts[workload]
        if known_key != key:
            return None
        if rollout.observe(observations, served, time.monotonic()):
            self._save()
        return rollout.as_dict()

    def decide(self, workload: str, action: str, reason: str) -> dict:
        """By hand (`torchrank-miner rollout promote|rollback`): ValueError when there is nothing to decide."""
        if workload not in self.rollouts:
            raise ValueError(f"no rollout of {workload}: its config has no canary")
        rollout = self.rollouts[workload][1]
        if rollout.done:
            raise ValueError(f"the {workload} rollout is already {rollout.state}")
        rollout.promote(reason) if action == "promote" else rollout.roll_back(reason)
        rollout.decided_by = "operator"
        self._save()
        return rollout.as_dict()

    def claim(self, workload: str, key: str) -> bool:
        """True for exactly one router per decision: the one that logs it and retires the loser."""
        known_key, rollout = self.rollouts.get(workload, (None, None))
        if known_key != key or not rollout.done or rollout.claimed:
            return False
        rollout.claimed = True
        self._save()
        return True

    def states(self) -> dict:
        return {workload: rollout.as_dict() for workload, (_, rollout) in self.rollouts.items()}


RolloutCoordinator = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0,
                                resources={HEAD_NODE_RESOURCE: 0.001})(RolloutBook)


def rollout_coordinator(miner_name: str, create: bool = True):
    """The miner's one coordinator (detached: it outlives the router replicas); None when
    `create` is False and it does not run."""
    name = f"{miner_name}-rollouts"
    if not create:
        try:
            return ray.get_actor(name, namespace="torchrank")
        except ValueError:
            return None
    return RolloutCoordinator.options(name=name, namespace="torchrank", get_if_exists=True,
                                      lifetime="detached").remote(store_key=name)


RETIRED = {"retired": True}  # the losing deployment's user_config: WorkloadReplica.reconfigure frees its model


def retire_deployment(app_name: str, deployment: str) -> str:
    """Retire the losing side of a decided rollout through the Serve controller, as a lightweight
    update of the application's own config, so no other deployment restarts: its user_config
    tells every replica to free its model, and a fixed-size one shrinks to one replica (Serve's
    floor for a deployment without autoscaling; taking it out of the application changes the
    application's args, which restarts every deployment: that is the config change to make).
    Only an application deployed from a config (`serve run <file>`, `serve deploy`: `make run`)
    has one to update; one deployed from Python (`serve.run(app)`) keeps its idle replicas.
    Blocking; returns what it did, for the decision's log line."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    client = _get_global_client()
    details = client.get_serve_details()
    configs = {name: app["deployed_app_config"] for name, app in details["applications"].items()
               if app.get("deployed_app_config")}
    if app_name not in configs:
        return f"{deployment} kept (idle): the application was deployed from Python, not from a config"
    mine = configs[app_name]
    autoscaled = details["applications"][app_name]["deployments"][deployment]["deployment_config"].get(
        "autoscaling_config")
    override = next((d for d in mine.get("deployments") or [] if d.get("name") == deployment), {"name": deployment})
    override = {**override, "user_config": RETIRED, **({} if autoscaled else {"num_replicas": 1})}
    mine["deployments"] = [d for d in mine.get("deployments") or [] if d.get("name") != deployment] + [override]
    client.deploy_apps(ServeDeploySchema.model_validate({
        "applications": list(configs.values()), "proxy_location": details.get("proxy_location"),
        "http_options": details.get("http_options") or {}, "target_capacity": details.get("target_capacity")}))
    return f"{deployment} retired: its model freed" + ("" if autoscaled else ", one replica left")


class RolloutRouter:
    """One workload's rollout in one router replica. `adapter` compares answers (agreement)
    and says whether an answer counts as a failure (unfinished); `metrics`: RouterMetrics.
    `drain_s`: how long after a decision the losing side may still be answering requests
    (the longest deadline), before it is retired; `keep_stable`: never retire the stable
    deployment (other deployments call it: the agents' retrieve tool calls stable embeddings)."""

    def __init__(self, workload: str, canary: CanaryConfig, stable, candidate, adapter, coordinator, metrics,
                 stable_model: str, candidate_model: str, drain_s: float = 0.0, keep_stable: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.workload, self.canary = workload, canary
        self.handles = {STABLE: stable, CANDIDATE: candidate}
        self.adapter, self.coordinator, self.metrics, self.clock = adapter, coordinator, metrics, clock
        self.models = {STABLE: stable_model, CANDIDATE: candidate_model}
        self.key = RolloutBook.key(canary.model_dump_json(), stable_model, candidate_model)
        self.drain_s, self.keep_stable = drain_s, keep_stable
        self.digests = {STABLE: "-", CANDIDATE: "-"}  # the weights' digests, once each side's info is read
        self.state: dict = {"state": SHADOW, "weight": 0.0, "salt": f"{workload}:{candidate_model}"}
        self.begun = False  # the coordinator's state is known: until then stable serves, nothing is mirrored
        self.observations: list[Observation] = []
        self.served = {STABLE: 0, CANDIDATE: 0}
        self.stable_times: deque[float] = deque(maxlen=100)  # stable's recent answers: the time it needs
        self.mirrors: set[asyncio.Task] = set()
        self._claimed = False
        self._tasks: list[asyncio.Task] = []

    @property
    def serving(self):
        """The deployment validators are served by when nothing else decides: what readiness probes."""
        return self.handles[CANDIDATE if self.state["state"] == PROMOTED else STABLE]

    async def start(self) -> None:
        """The shared state of this rollout (begun if new) and the reports every SYNC_S. A
        coordinator that does not answer does not stop the router: stable serves until it does."""
        await self._begin()
        self._tasks.append(asyncio.create_task(self._sync_forever()))

    async def _begin(self) -> None:
        try:
            self.state = await asyncio.wait_for(self.coordinator.begin.remote(
                self.workload, self.canary.model_dump_json(), self.models[STABLE], self.models[CANDIDATE]),
                COORDINATOR_TIMEOUT_S * 5)
            self.begun = True
        except Exception as exc:
            log.warning("the rollout coordinator did not answer (%s): stable serves %s until it does",
                        type(exc).__name__, self.workload)

    @property
    def candidate_ready(self) -> bool:
        """The candidate has answered once: until then (its model may take minutes to load) no
        request goes to it, so a slow start is not counted against it."""
        return self.digests[CANDIDATE] != "-"

    async def read_digests(self, timeout_s: float) -> None:
        """Each side's weights digest from its info() (the metrics' labels), until both are known."""
        for side, handle in self.handles.items():
            if self.digests[side] == "-":
                try:
                    info = await asyncio.wait_for(handle.info.remote(), timeout_s)
                    self.digests[side] = info.get("weights_sha256") or "unknown"
                except Exception:  # not answering yet (the candidate may still be loading)
                    pass

    def side_for(self, caller: str) -> str:
        state = self.state["state"]
        if state == CANARY:
            return CANDIDATE if on_candidate(caller, self.state["weight"], self.state["salt"]) else STABLE
        return CANDIDATE if state == PROMOTED else STABLE

    def _candidate_budget(self, remaining: float) -> float:
        """Of the time left, what the candidate may use: all but what stable needs to answer
        after it (1.5 x stable's recent p95; half the time until stable has answered)."""
        reserve = 1.5 * p95(list(self.stable_times)) if self.stable_times else remaining / 2
        return remaining - reserve

    async def serve(self, caller: str, deadline: float, call: Call) -> dict:
        """The answer for a validator request: `call(handle, deadline)` runs it on one side."""
        side, comparing = self.side_for(caller), self.state["state"] in (SHADOW, CANARY)
        if comparing and not (self.begun and self.candidate_ready):
            side, comparing = STABLE, False
        mirror = comparing
        now = self.clock()
        timeout = deadline - now
        if side == CANDIDATE and comparing:
            budget = self._candidate_budget(timeout)
            if budget > 0:
                counted = True
                try:
                    answer = await call(self.handles[CANDIDATE], now + budget)
                    failed = self.adapter.unfinished(answer)
                except ApiError as err:  # refused for load, late, or failing: stable serves it
                    answer, failed, counted = None, True, err.code not in NOT_COUNTED
                except Exception:  # the candidate's own failure (a RayTaskError from its replica)
                    answer, failed = None, True
                seconds = self.clock() - now
                if not failed:
                    self._count(CANDIDATE, seconds, False)
                    self.served[CANDIDATE] += 1
                    if not self._maybe_mirror(STABLE, answer, CANDIDATE, seconds, timeout, call):
                        self.observations.append(Observation(candidate_s=seconds, candidate_failed=False))
                    return answer
                if counted:
                    self._count(CANDIDATE, seconds, True)
                    self.observations.append(Observation(candidate_s=seconds, candidate_failed=True))
                mirror = False  # the candidate has just failed it: stable serves it, with the time left
            side = STABLE
        started = self.clock()
        try:
            answer = await call(self.handles[side], deadline)
        except Exception as err:
            if comparing and not (isinstance(err, ApiError) and err.code in NOT_COUNTED):
                seconds = self.clock() - started
                self._count(side, seconds, True)
                self.observations.append(Observation(**{f"{side}_s": seconds, f"{side}_failed": True}))
            raise
        seconds = self.clock() - started
        self.served[side] += 1
        if side == STABLE:
            self.stable_times.append(seconds)
        if comparing:
            failed = self.adapter.unfinished(answer)
            self._count(side, seconds, failed)
            other = CANDIDATE if side == STABLE else STABLE
            if not (mirror and self._maybe_mirror(other, answer, side, seconds, timeout, call)):
                self.observations.append(Observation(**{f"{side}_s": seconds, f"{side}_failed": failed}))
        return answer

    def _maybe_mirror(self, other: str, answer: dict, side: str, seconds: float, timeout: float, call: Call) -> bool:
        """Whether the request is mirrored to the `other` side (its observation then comes from the mirror)."""
        if len(self.mirrors) >= self.canary.max_shadow_in_flight or random.random() >= self.canary.shadow_share:
            return False
        task = asyncio.create_task(self._mirror(other, answer, side, seconds, timeout, call))
        self.mirrors.add(task)
        task.add_done_callback(self.mirrors.discard)
        return True

    async def _mirror(self, other: str, answer: dict, side: str, seconds: float, timeout: float, call: Call) -> None:
        """The same request on the `other` side, with the validator's whole timeout of its own."""
        started, other_answer = self.clock(), None
        try:
            other_answer = await call(self.handles[other], started + timeout)
            other_failed = self.adapter.unfinished(other_answer)
        except ApiError as err:
            if err.code in NOT_COUNTED:  # refused for load: only the served side's call is seen
                self.observations.append(Observation(**{f"{side}_s": seconds,
                                                        f"{side}_failed": self.adapter.unfinished(answer)}))
                return
            other_failed = True
        except Exception:  # a mirrored call must never surface: count it as that side's failure
            log.exception("a mirrored %s call to the %s failed", self.workload, other)
            other_failed = True
        other_s = self.clock() - started
        self._count(other, other_s, other_failed)
        answers = {side: answer, other: other_answer}
        times = {side: seconds, other: other_s}
        failed = {side: self.adapter.unfinished(answer), other: other_failed}
        agree = measure = None
        if other_answer is not None:
            try:  # off the event loop: decoding two images takes milliseconds
                agree, measure = await asyncio.to_thread(self.adapter.agreement, answers[STABLE], answers[CANDIDATE],
                                                         self.canary)
            except Exception:  # answers that cannot be compared (shapes differ): they disagree
                agree = False
        if agree is not None:
            self.metrics.rollout_comparisons.inc(1, {"workload": self.workload,
                                                     "result": "agree" if agree else "disagree"})
        self.observations.append(Observation(stable_s=times[STABLE], stable_failed=failed[STABLE],
                                             candidate_s=times[CANDIDATE], candidate_failed=failed[CANDIDATE],
                                             agree=agree, measure=measure))

    def _count(self, side: str, seconds: float, failed: bool) -> None:
        tags = {"workload": self.workload, "role": side, "digest": self.digests[side]}
        self.metrics.rollout_calls.inc(1, {**tags, "outcome": "failed" if failed else "ok"})
        self.metrics.rollout_seconds.observe(seconds, tags)

    async def sync(self) -> None:
        """Report what this replica saw and take back the shared state. Once the rollout is
        decided, the one router that claims the decision logs it and, after drain_s, retires
        the losing side."""
        if not self.begun:
            await self._begin()
            return
        observations, served = self.observations, self.served
        self.observations, self.served = [], {STABLE: 0, CANDIDATE: 0}
        try:
            state = await asyncio.wait_for(
                self.coordinator.report.remote(self.workload, self.key, observations, served), COORDINATOR_TIMEOUT_S)
        except Exception as exc:
            # Keep the last state: a coordinator restarting (Ray restarts it) holds no decision back for long.
            log.warning("the rollout coordinator did not answer (%s); keeping the %s state", type(exc).__name__,
                        self.state["state"])
            self.observations[:0] = observations[-1000:]
            for side, count in served.items():
                self.served[side] += count
            if isinstance(getattr(exc, "cause", None), KeyError):  # it has no record of this rollout
                await self._begin()
            return
        if state is None:  # the coordinator runs another rollout of this workload: this router's config is old
            return
        self.state = state
        if state["state"] in (PROMOTED, ROLLED_BACK) and not self._claimed:
            self._claimed = True  # asked once per router: the coordinator answers True to one of them
            if await asyncio.wait_for(self.coordinator.claim.remote(self.workload, self.key), COORDINATOR_TIMEOUT_S):
                self._tasks.append(asyncio.create_task(self._log_and_retire(state)))
        self.publish()

    async def _log_and_retire(self, state: dict) -> None:
        decision = state["state"]
        loser = STABLE if decision == PROMOTED else CANDIDATE
        event = {"workload": self.workload, "decision": decision, "by": state["decided_by"], "reason": state["reason"],
                 "comparisons": state["comparisons"], "served": state["served"], "traffic_s": state["traffic_s"],
                 "stable_model": self.models[STABLE], "candidate_model": self.models[CANDIDATE],
                 "stable_digest": self.digests[STABLE], "candidate_digest": self.digests[CANDIDATE]}
        if loser == STABLE and self.keep_stable:
            log.info("rollout", extra={"rollout": {**event, "retired": f"{self.handles[STABLE].deployment_name} kept: "
                                                                        f"other deployments call it"}})
            return
        log.info("rollout", extra={"rollout": {**event, "retired": f"after {self.drain_s:g} s"}})
        await asyncio.sleep(self.drain_s)  # requests already on the losing side finish first
        retired = await self._retire(self.handles[loser].deployment_name)
        log.info("rollout retired", extra={"rollout": {"workload": self.workload, "retired": retired}})

    @staticmethod
    async def _retire(deployment: str) -> str:
        try:
            from ray import serve

            app_name = serve.get_replica_context().app_name
            return await asyncio.to_thread(retire_deployment, app_name, deployment)
        except Exception as exc:  # the decision stands; the idle deployment only holds its resources
            log.warning("could not retire %s: %s", deployment, exc)
            return f"{deployment} kept (idle): {type(exc).__name__}"

    def publish(self) -> None:
        if "-" in self.digests.values():  # labelled by both digests: one series per state, not a stale one
            return
        m, tags = self.metrics, {"workload": self.workload}
        for state in STATES:
            m.rollout_state.set(int(state == self.state["state"]), {
                **tags, "state": state, "stable_digest": self.digests[STABLE],
                "candidate_digest": self.digests[CANDIDATE]})
        m.rollout_weight.set(self.state["weight"], tags)

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_S)
            try:
                await self.sync()
            except Exception:
                log.exception("syncing the %s rollout failed", self.workload)

    def info(self) -> dict:
        """For /info: the state and both sides' models and digests."""
        return {**{k: v for k, v in self.state.items() if k != "salt"},
                "stable": {"model": self.models[STABLE], "weights_sha256": self.digests[STABLE]},
                "candidate": {"model": self.models[CANDIDATE], "weights_sha256": self.digests[CANDIDATE]}}
