"""The edge: the refusals HAProxy makes before a request reaches Python, and the routers that keep
its state current (deployments/haproxy/edge.cfg has the rules; read it beside this file).

Every router replica writes what it knows to a state file in the edge folder of its node's HAProxy
(beside the admin socket: /tmp/haproxy-serve/<node id>/torchrank-edge): its routes, each subnet's
hotkeys as its metagraph and auth policy would answer them, each hotkey's rate, how long a deadline
admission could meet now per stake tier, and the client addresses it has seen sign (verified
requests). One router per node, the leader (the lowest replica id among the fresh files), merges
every file into HAProxy's maps: it writes the map files (a reload of HAProxy reads them) and
sends the changes over the runtime API (the admin socket), so a change lands without a reload.

What the edge refuses, the router would refuse too; where they could differ the edge lets the
request through:
  - an empty or missing map entry refuses nothing (a subnet whose metagraph is not usable has no
    marker; the router then answers 503 itself);
  - shedding is published only while every router replica of the app writes its state on this
    node, and it is the least any of them would shed (a request shed at the edge would have been
    shed by whichever router got it);
  - a state file not rewritten for FRESH_S drops out of the shedding; its routes and hotkeys stay
    until LIVE_S, so a router busy for a few seconds does not turn its routes into 404s.
HAProxy's counts of what it refused (its `edge_refused` table) reach Prometheus through the leader.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from serve_app.errors import ApiError
from serve_app.router.policy import authorise

log = logging.getLogger("ray.serve.torchrank.router")

EDGE_DIRNAME = "torchrank-edge"
MAPS = ("routes", "hotkeys", "trusted", "shed", "edge")
FRESH_S = 3.0  # a state file older than this is a router that may not be shedding any more
LIVE_S = 600.0  # older than this: a router that is gone (its routes and hotkeys leave the maps)
RATE_WINDOW_S = 10.0  # the stick tables' http_req_rate(10s)
RATE_SLACK = 1.5  # the edge's hotkey rate over the router's own: the router limits exactly
NEVER_MS = 10**9  # a deadline no request can have: shed whatever it asks
UNLIMITED = 10**9
MAX_COMMANDS_PER_CALL = 64  # runtime API commands sent in one connection (HAProxy's 16 KiB line)


def subnet_key(app: str, netuid: int) -> str:
    """One subnet of one application: two apps may serve the same netuid under different policies."""
    return f"{app}:{netuid}"


def tier(stake: float) -> str:
    return "top" if math.isinf(stake) else str(int(stake))


def route_entries(app: str, routes: Mapping) -> dict[str, str]:
    """routes.map: full path -> "<subnet key>|<scheme>|<default deadline ms>"."""
    return {path: f"{subnet_key(app, r.subnet.netuid)}|{r.subnet.auth.scheme}|{math.ceil(r.subnet.timeout_s * 1000)}"
            for path, r in routes.items()}


def hotkey_entries(key: str, view, policy, rate_limit, rate_limited: bool) -> dict[str, str]:
    """hotkeys.map for one subnet: "<key>/<hotkey>" -> "ok|<tier>|<requests per 10 s>" or the 403 code
    authorise() gives; "<key>/-" while the view is usable. A view missing or past its max age: no
    entries (the router answers 503 or lets the allow-listed in)."""
    if view is None or view.expired:
        return {}
    entries = {f"{key}/-": "loaded"}
    for hotkey in [*view.neurons, *policy.allow_hotkeys, *policy.deny_hotkeys]:
        try:
            authorise(hotkey, view, policy)
        except ApiError as err:
            entries[f"{key}/{hotkey}"] = err.code.value
            continue
        allow_listed = hotkey in policy.allow_hotkeys
        rate = rate_limit.rate(hotkey, view, allow_listed) if rate_limited else None
        if rate is None:
            per_window = UNLIMITED
        else:  # the router's bucket over the window (its rate is per replica), with slack
            total = rate * rate_limit.replicas
            per_window = math.ceil(RATE_SLACK * total * (RATE_WINDOW_S + rate_limit.cfg.burst_s)) + 1
        stake = math.inf if allow_listed else view.neuron(hotkey).stake
        entries[f"{key}/{hotkey}"] = f"ok|{tier(stake)}|{per_window}"
    return entries


def shed_entries(routes: Mapping, tiers: Iterable[float], shares: Mapping[str, float] = {}) -> dict[str, str]:
    """shed.map: "<path>|<tier>" -> "<ms>|<per mille>": the least deadline (ms) admission could meet now
    for the smallest request of that stake, and the share of that tier's newcomers to shed whatever
    their deadline (ShedShare); only where either is above zero."""
    entries = {}
    stakes = sorted(set(tiers))
    for path, route in routes.items():
        for stake in stakes:
            need = route.admission.least_deadline_s(stake)
            key = f"{path}|{tier(stake)}"
            permille = round(1000 * shares.get(key, 0.0))
            if need > 0 or permille > 0:
                entries[key] = f"{NEVER_MS if math.isinf(need) else math.ceil(need * 1000)}|{permille}"
    return entries


class ShedShare:
    """How much of each route's and stake tier's work the edge should shed at random, from what the
    router's admission did with what reached it (`offered`).

    Under sustained overload the deadline rule alone lets a sync period's worth of newcomers through
    each time the queue dips under the threshold, and the router spends its CPU shedding them. Here,
    over each period, f = the share the router shed of what reached it; the share the edge should
    shed of what is offered is then 1 - (1 - f)(1 - p), p the share it shed already, kept a little
    under (MARGIN) so the router always sees somewhat more than it can take and keeps measuring.
    A period in which the router took all that reached it eases the share off (EASE): under
    sustained overload such a period is chance (the queue dipped under its threshold for a moment),
    and halving the share there let twice to three times the load through the next period, which
    the router then spent its CPU shedding. With nothing reaching the router the share halves each
    period (DECAY): load that ends is let in within about 2 s (EASE: about 5 s)."""

    MARGIN = 0.95
    EASE = 0.8
    DECAY = 0.5
    MIN_SEEN = 4  # fewer requests in a period: not enough to move the share up
    MAX = 0.98

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = {}  # "<path>|<tier>" -> [reached admission, shed] this period
        self.share: dict[str, float] = {}

    def offered(self, path: str, priority: float, shed: bool) -> None:
        counts = self.seen.setdefault(f"{path}|{tier(priority)}", [0, 0])
        counts[0] += 1
        counts[1] += shed

    def update(self) -> dict[str, float]:
        """A period ended: the shares for the next one."""
        for key in set(self.seen) | set(self.share):
            seen, shed = self.seen.get(key, (0, 0))
            before = self.share.get(key, 0.0)
            if shed and seen >= self.MIN_SEEN:
                target = (1 - (1 - shed / seen) * (1 - before)) * self.MARGIN
                after = min(self.MAX, max(target, before * self.DECAY))
            elif seen >= self.MIN_SEEN:
                after = before * self.EASE
            else:
                after = before * self.DECAY
            if after < 0.01:
                self.share.pop(key, None)
            else:
                self.share[key] = after
        self.seen = {}
        return dict(self.share)


def stake_tiers(view, policy) -> set[float]:
    if view is None:
        return set()
    tiers = {n.stake for n in view.neurons.values()}
    return tiers | ({math.inf} if policy.allow_hotkeys else set())


@dataclass
class State:
    """One router replica's view, as it writes it (and the leader reads it)."""

    replica: str
    app: str
    replicas: int  # the app's router replicas: shedding needs all of them
    at: float = 0.0  # time.time() of the write
    routes: dict = field(default_factory=dict)
    hotkeys: dict = field(default_factory=dict)
    shed: dict = field(default_factory=dict)
    trusted: dict = field(default_factory=dict)  # address -> last verified request (time.time())
    stranger: int = UNLIMITED  # requests per 10 s from an address not trusted

    def dump(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True, separators=(",", ":"))

    @classmethod
    def load(cls, text: str) -> "State":
        return cls(**json.loads(text))


def merge(states: list[State], now: float, trusted_s: float) -> dict[str, dict[str, str]]:
    """The maps HAProxy should hold, from every router's state (see the module docstring)."""
    live = sorted((s for s in states if now - s.at <= LIVE_S), key=lambda s: s.at)
    maps: dict[str, dict[str, str]] = {name: {} for name in MAPS}
    if not live:
        return maps
    for state in live:  # the freshest wins where two disagree (an app redeployed with another policy)
        maps["routes"].update(state.routes)
        maps["hotkeys"].update(state.hotkeys)
        for address, seen in state.trusted.items():
            if now - seen <= trusted_s:
                maps["trusted"][address] = "1"
    by_app: dict[str, list[State]] = {}
    for state in live:
        if now - state.at <= FRESH_S:
            by_app.setdefault(state.app, []).append(state)
    for app_states in by_app.values():
        if len(app_states) < app_states[-1].replicas:
            continue  # a router of this app is elsewhere or silent: it might take what we would shed
        for key in set.intersection(*(set(s.shed) for s in app_states)):
            # The least any router would shed: the deadline it could meet, and the share.
            need, share = zip(*(map(int, s.shed[key].split("|")) for s in app_states))
            maps["shed"][key] = f"{min(need)}|{min(share)}"
    maps["edge"] = {"on": "1", "stranger": str(max(s.stranger for s in live))}
    return maps


def changes(old: Mapping[str, str], new: Mapping[str, str], name: str) -> list[str]:
    """Runtime API commands turning map `name` (its file path) from `old` into `new`."""
    commands = [f"del map {name} {key}" for key in old if key not in new]
    for key, value in new.items():
        if key not in old:
            commands.append(f"add map {name} {key} {value}")
        elif old[key] != value:
            commands.append(f"set map {name} {key} {value}")
    return commands


def parse_map(text: str) -> dict[str, str]:
    """`show map <file>` -> {key: value} (lines "<ref id> <key> <value>")."""
    entries = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].startswith("0x"):
            entries[parts[1]] = parts[2]
    return entries


def parse_counts(text: str) -> dict[tuple[str, str], int]:
    """`show table edge_refused` -> (route path or "-", reason) -> requests refused since HAProxy started."""
    counts = {}
    for line in text.splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if "key" in fields and "http_req_cnt" in fields and "|" in fields["key"]:
            path, reason = fields["key"].rsplit("|", 1)
            counts[(path, reason)] = int(fields["http_req_cnt"])
    return counts


def by_reason(counts: Mapping[tuple[str, str], int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (_, reason), n in counts.items():
        out[reason] = out.get(reason, 0) + n
    return dict(sorted(out.items()))


def render(entries: Mapping[str, str]) -> str:
    return "".join(f"{key} {value}\n" for key, value in sorted(entries.items()))


def edge_dir() -> Optional[Path]:
    """This node's HAProxy folder (Ray's per-node socket folder) + EDGE_DIRNAME; None without HAProxy."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return None
    try:
        import ray
        from ray.serve._private.constants import RAY_SERVE_HAPROXY_SOCKET_PATH

        node = ray.get_runtime_context().get_node_id()
    except Exception:
        return None
    return Path(RAY_SERVE_HAPROXY_SOCKET_PATH).parent / node / EDGE_DIRNAME


def socket_name() -> str:
    """The admin socket's file name in Ray's per-node HAProxy folder (RAY_SERVE_HAPROXY_SOCKET_PATH)."""
    try:
        from ray.serve._private.constants import RAY_SERVE_HAPROXY_SOCKET_PATH
    except ImportError:
        return "admin.sock"
    return Path(RAY_SERVE_HAPROXY_SOCKET_PATH).name


class HAProxySocket:
    """HAProxy's runtime API over its admin socket: one connection per batch of commands."""

    def __init__(self, path: Path, timeout_s: float = 2.0):
        self.path, self.timeout_s = path, timeout_s

    async def run(self, commands: list[str]) -> str:
        out = []
        for start in range(0, len(commands), MAX_COMMANDS_PER_CALL):
            batch = ";".join(commands[start:start + MAX_COMMANDS_PER_CALL])
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.path)), self.timeout_s)
            try:
                writer.write(batch.encode() + b"\n")
                await writer.drain()
                out.append((await asyncio.wait_for(reader.read(), self.timeout_s)).decode(errors="replace"))
            finally:
                writer.close()
        return "".join(out)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class EdgeKeeper:
    """A router replica's part in the edge: `trust(address)` on each verified request; `start()`
    runs `sync` every `cfg.sync_s`. `describe` is for /info."""

    def __init__(self, cfg, app: str, replica: str, replicas: int, table, folder: Optional[Path],
                 on_refused: Callable[[str, str, int], None] = lambda path, reason, n: None, clock=time.time):
        self.cfg, self.app, self.replica, self.replicas = cfg, app, replica, replicas
        self.table = table  # the RouteTable: routes, metagraphs, admission
        self.folder = folder
        self.socket = HAProxySocket(folder.parent / socket_name()) if folder is not None else None
        # (route path or "-", reason, refusals since the last read): each app's leader for its own routes,
        # the node's leader for "-" (paths no route has)
        self.on_refused = on_refused
        self.clock = clock
        self.trusted: dict[str, float] = {}
        self.leader = False  # of this node: it updates HAProxy
        self.app_leader = False  # of this app's routers on this node: it reports the app's refusals
        self.pushed: Optional[dict[str, dict[str, str]]] = None  # what HAProxy holds, as last sent
        self.haproxy_pid: Optional[str] = None
        self.refused: dict[tuple[str, str], int] = {}  # since HAProxy started, as last read
        self.errors = 0
        self._last_written = ""
        self._last_write_at = 0.0
        self._hotkeys: dict[str, tuple[tuple, dict, set]] = {}  # subnet key -> (view identity, entries, tiers)
        self._counted = False  # the first read of HAProxy's counts is a baseline, not news
        self.shed_share = ShedShare()
        self._task: Optional[asyncio.Task] = None

    @property
    def active(self) -> bool:
        return self.cfg.enabled and self.folder is not None

    def trust(self, address: Optional[str]) -> None:
        if address:
            self.trusted[address] = self.clock()

    def offered(self, path: str, priority: float, shed: bool) -> None:
        """A request reached admission on `path` at this stake and was shed (or admitted)."""
        self.shed_share.offered(path, priority, shed)

    def start(self) -> None:
        if self.active:
            from serve_app.ops.periodic import every

            self._task = asyncio.create_task(every(self.cfg.sync_s, self.sync, "keeping the edge current"))

    def state(self) -> State:
        now = self.clock()
        for address in [a for a, seen in self.trusted.items() if now - seen > self.cfg.trusted_s]:
            del self.trusted[address]
        state = State(replica=self.replica, app=self.app, replicas=self.replicas, at=now,
                      routes=route_entries(self.app, self.table.routes),
                      trusted=dict(self.trusted), stranger=math.ceil(self.cfg.stranger_rps * RATE_WINDOW_S))
        tiers: dict[str, set[float]] = {}
        shares = self.shed_share.update()
        for route in self.table.routes.values():
            subnet = route.subnet
            key = subnet_key(self.app, subnet.netuid)
            view = route.metagraph.view
            if key not in tiers:
                # Recomputed only for a new metagraph view (or one that just expired).
                identity = (id(view), getattr(view, "fetched_at", None), getattr(view, "expired", None))
                cached = self._hotkeys.get(key)
                if cached is None or cached[0] != identity:
                    cached = self._hotkeys[key] = (identity, hotkey_entries(
                        key, view, subnet.auth, route.rate_limit, subnet.rate_limit.enabled),
                        stake_tiers(view, subnet.auth))
                state.hotkeys.update(cached[1])
                tiers[key] = cached[2]
            state.shed.update(shed_entries({route.path: route}, tiers[key], shares))
        return state

    async def sync(self) -> None:
        """Write this router's state; as the leader, bring HAProxy's maps to the merged state."""
        state = self.state()
        self.folder.mkdir(parents=True, exist_ok=True)
        now = state.at
        content = dataclasses.replace(state, at=0.0).dump()
        # Unchanged state is rewritten once a second: its time says this router is still there.
        if content != self._last_written or now - self._last_write_at >= 1.0:
            write_atomic(self.folder / f"router-{self.replica}.json", state.dump())
            self._last_written, self._last_write_at = content, now
        states = self._read_states()
        fresh = sorted((s.replica, s.app) for s in states if now - s.at <= FRESH_S)
        self.leader = bool(fresh) and fresh[0][0] == self.replica
        self.app_leader = [r for r, app in fresh if app == self.app][:1] == [self.replica]
        if not self.leader:
            self.pushed = None  # whoever leads next time starts from what HAProxy holds
        try:
            if self.leader:
                await self._push(merge(states, now, self.cfg.trusted_s))
            await self._count_refusals()
        except (OSError, asyncio.TimeoutError) as exc:
            self.errors += 1
            self.pushed = None
            if self.errors in (1, 10) or self.errors % 100 == 0:
                log.warning("the edge could not reach HAProxy's runtime API (%s: %s); the router still checks "
                            "every request itself", type(exc).__name__, exc)

    def _read_states(self) -> list[State]:
        states, now = [], self.clock()
        for path in self.folder.glob("router-*.json"):
            try:
                state = State.load(path.read_text())
            except (OSError, ValueError, TypeError):
                continue  # a file being replaced, or from another version: skipped this round
            if now - state.at > LIVE_S:  # a router long gone: its file goes too
                path.unlink(missing_ok=True)
                continue
            states.append(state)
        return states

    async def _push(self, maps: dict[str, dict[str, str]]) -> None:
        info = await self.socket.run(["show info"])
        pid = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Pid:")), None)
        if pid != self.haproxy_pid or self.pushed is None:
            # A new HAProxy (a reload) or a new leader: read what it holds instead of trusting memory.
            self.haproxy_pid = pid
            self.pushed = {name: parse_map(await self.socket.run([f"show map {self._path(name)}"]))
                           for name in MAPS}
        commands = []
        for name in MAPS:
            if maps[name] != self.pushed[name]:
                # The file first: a reload between the two reads it.
                write_atomic(self._path(name), render(maps[name]))
                commands += changes(self.pushed[name], maps[name], str(self._path(name)))
        if commands:
            # "on" goes last: a map is never switched on half filled.
            commands.sort(key=lambda c: c.endswith(" on 1"))
            await self.socket.run(commands)
        self.pushed = maps

    async def _count_refusals(self) -> None:
        """Every router reads HAProxy's counts (for /info); one router reports what is new for each route."""
        counts = parse_counts(await self.socket.run(["show table edge_refused"]))
        if self._counted:
            for (path, reason), count in counts.items():
                if not (self.leader if path == "-" else self.app_leader and path in self.table.routes):
                    continue
                before = self.refused.get((path, reason), 0)
                new = count - before if count >= before else count  # fewer: a new HAProxy counts from 0
                if new > 0:
                    self.on_refused(path, reason, new)
        self._counted = self.leader or self.app_leader  # a router's first read is a baseline, not news
        self.refused = counts

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.map"

    def describe(self) -> dict:
        return {"enabled": self.active, "leader": self.leader, "trusted_addresses": len(self.trusted),
                "refused_since_haproxy_start": by_reason(self.refused),
                "runtime_api_errors": self.errors}

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
