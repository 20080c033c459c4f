"""Who is on a subnet: metagraph sources and the cache the router authorises from.

Two sources give the same `MetagraphView`: the live chain through the bittensor SDK
(`client.subnets.metagraph(netuid)`) and a JSON snapshot file for local/offline use.
`MetagraphCache` refreshes in the background and keeps the last good view when a
refresh fails, so a short chain outage never blocks callers that view admits; past the
source's `max_age_s` the view no longer authorises anyone but the allow-list.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Mapping, Optional, Protocol, Union

from pydantic import BaseModel, ConfigDict, Field

from serve_app.config import ChainMetagraph, SnapshotMetagraph
from serve_app.ops.periodic import every

log = logging.getLogger("ray.serve.torchrank.metagraph")

# With no view loaded every request but the allow-list's is refused: retry from this soon, doubling.
FIRST_RETRY_S = 1.0


@dataclass(frozen=True)
class Neuron:
    uid: int
    hotkey: str
    stake: float
    validator_permit: bool
    # Its standing (serve_app/chain/standing.py reads the miner's own): scores 0-1 as the chain
    # keeps them; emission in the subnet's alpha, received at the last epoch.
    incentive: float = 0.0
    emission: float = 0.0
    trust: float = 0.0
    consensus: float = 0.0
    rank: float = 0.0
    dividends: float = 0.0
    pruning_score: float = 0.0
    block_at_registration: int = 0
    axon: Optional[str] = None  # "ip:port" ("[ip6]:port") as the chain holds it; None when nothing is served


@dataclass(frozen=True)
class MetagraphView:
    netuid: int
    block: int
    neurons: Mapping[str, Neuron]
    fetched_at: float = field(default_factory=time.time)
    max_age_s: float = math.inf  # set by MetagraphCache from the source's config
    tempo: int = 360  # an epoch every tempo + 1 blocks
    price: Optional[float] = None  # TAO per alpha (spot), when known
    immunity_period: Optional[int] = None  # blocks a new registration cannot be pruned
    max_uids: Optional[int] = None

    def neuron(self, hotkey: str) -> Optional[Neuron]:
        return self.neurons.get(hotkey)

    @property
    def age_s(self) -> float:
        return time.time() - self.fetched_at

    @property
    def expired(self) -> bool:
        """Too old to authorise from: the source has failed for longer than max_age_s."""
        return self.age_s > self.max_age_s


Score = Annotated[float, Field(ge=0, le=1)]  # the chain keeps them as u16 fractions


class SnapshotNeuron(BaseModel):
    """One row of a snapshot: the SDK's MetagraphNeuron fields the miner uses, under the same
    names (stake and emission as plain numbers in the subnet's alpha; emission per epoch)."""

    model_config = ConfigDict(extra="ignore")
    uid: int = Field(ge=0)
    hotkey: str = Field(min_length=1)
    validator_permit: bool = False
    total_stake: float = Field(default=0.0, ge=0)
    incentive: Score = 0.0
    emission: float = Field(default=0.0, ge=0)
    trust: Score = 0.0
    consensus: Score = 0.0
    rank: Score = 0.0
    dividends: Score = 0.0
    pruning_score: Score = 0.0
    block_at_registration: int = Field(default=0, ge=0)
    axon: Optional[str] = None


class Snapshot(BaseModel):
    model_config = ConfigDict(extra="ignore")
    netuid: int
    block: int = 0
    tempo: int = Field(default=360, ge=0)
    price: Optional[float] = Field(default=None, ge=0)
    immunity_period: Optional[int] = Field(default=None, ge=0)
    max_uids: Optional[int] = Field(default=None, ge=0)
    neurons: list[SnapshotNeuron]


def view_from_snapshot(data: object, netuid: int) -> MetagraphView:
    snap = Snapshot.model_validate(data)
    if snap.netuid != netuid:
        raise ValueError(f"snapshot is for netuid {snap.netuid}, not {netuid}")
    neurons = {
        n.hotkey: Neuron(uid=n.uid, hotkey=n.hotkey, stake=n.total_stake, validator_permit=n.validator_permit,
                         incentive=n.incentive, emission=n.emission, trust=n.trust, consensus=n.consensus,
                         rank=n.rank, dividends=n.dividends, pruning_score=n.pruning_score,
                         block_at_registration=n.block_at_registration, axon=n.axon)
        for n in snap.neurons
    }
    return MetagraphView(netuid=netuid, block=snap.block, neurons=neurons, tempo=snap.tempo, price=snap.price,
                         immunity_period=snap.immunity_period, max_uids=snap.max_uids)


def view_from_sdk(metagraph) -> MetagraphView:
    """Convert the SDK's `bittensor.metagraph.Metagraph`. Stake is `total_stake` and emission
    `emission`, both in the subnet's alpha; the immunity period comes from the runtime record
    (`raw`), which carries the subnet's hyperparameters."""
    neurons = {
        n.hotkey: Neuron(
            uid=n.uid, hotkey=n.hotkey, stake=float(n.total_stake.amount), validator_permit=bool(n.validator_permit),
            incentive=float(n.incentive), emission=float(n.emission.amount), trust=float(n.trust),
            consensus=float(n.consensus), rank=float(n.rank), dividends=float(n.dividends),
            pruning_score=float(n.pruning_score), block_at_registration=int(n.block_at_registration), axon=n.axon,
        )
        for n in metagraph.neurons
    }
    immunity = (metagraph.raw or {}).get("immunity_period")
    return MetagraphView(netuid=metagraph.netuid, block=metagraph.block, neurons=neurons, tempo=int(metagraph.tempo),
                         price=metagraph.price, immunity_period=None if immunity is None else int(immunity),
                         max_uids=metagraph.max_uids or None)


class MetagraphSource(Protocol):
    description: str

    async def fetch(self) -> MetagraphView: ...


class SnapshotSource:
    def __init__(self, cfg: SnapshotMetagraph, netuid: int):
        self.path = Path(cfg.path)
        self.netuid = netuid
        self.description = f"snapshot {self.path}"

    async def fetch(self) -> MetagraphView:
        return self.load()

    def load(self) -> MetagraphView:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read metagraph snapshot {self.path}: {exc}") from None
        return view_from_snapshot(data, self.netuid)


class ChainSource:
    def __init__(self, cfg: ChainMetagraph, netuid: int, client_factory=None):
        self.cfg = cfg
        self.netuid = netuid
        self.description = f"chain {cfg.network}"
        self._client_factory = client_factory or self._sdk_client

    @staticmethod
    def _sdk_client(network: str):
        import bittensor

        return bittensor.Subtensor(network)

    async def fetch(self) -> MetagraphView:
        async def read():
            async with self._client_factory(self.cfg.network) as client:
                return await client.subnets.metagraph(self.netuid, commitments=False)

        try:
            metagraph = await asyncio.wait_for(read(), self.cfg.timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"metagraph read from {self.cfg.network} took over {self.cfg.timeout_s:g}s") from None
        if metagraph is None:
            raise LookupError(f"subnet {self.netuid} does not exist on {self.cfg.network}")
        return view_from_sdk(metagraph)


def make_source(cfg: Union[SnapshotMetagraph, ChainMetagraph], netuid: int) -> MetagraphSource:
    if isinstance(cfg, SnapshotMetagraph):
        return SnapshotSource(cfg, netuid)
    return ChainSource(cfg, netuid)


class MetagraphCache:
    """The latest good view of one subnet, refreshed every `refresh_s` in the background.

    `view` is the last good view whatever its age (readiness, /info and metrics report it);
    it carries `max_age_s`, past which `authorise` admits only allow-listed hotkeys."""

    def __init__(self, source: MetagraphSource, refresh_s: float, max_age_s: float):
        self.source = source
        self.refresh_s = refresh_s
        self.max_age_s = max_age_s
        self.view: Optional[MetagraphView] = None
        self.last_error: Optional[str] = None
        self.failures = 0
        self.behind_refused = 0  # views refused for a block behind the current one
        self._behind_logged = False  # warned since the last accepted view
        self._task: Optional[asyncio.Task] = None

    async def refresh(self) -> bool:
        try:
            view = await self.source.fetch()
        except Exception as exc:  # keep the last good view whatever went wrong
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("metagraph refresh from %s failed (%d in a row), keeping the last good copy: %s",
                        self.source.description, self.failures, self.last_error)
            return False
        if self.view is not None and view.block < self.view.block:
            # A lagging or forked endpoint: its older view may re-admit a validator since deregistered.
            self.behind_refused += 1
            if not self._behind_logged:
                self._behind_logged = True
                log.warning("metagraph from %s is at block %d, behind the current view's %d: keeping the current one",
                            self.source.description, view.block, self.view.block)
            self.last_error = f"refused a view at block {view.block}, behind the current {self.view.block}"
            return False
        self.view, self.last_error, self.failures = replace(view, max_age_s=self.max_age_s), None, 0
        self._behind_logged = False
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                every(self.next_delay_s, self.refresh, "refreshing the metagraph",
                      wait_first=True))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def next_delay_s(self) -> float:
        """The wait before the next read: refresh_s once a view is loaded; until then a backoff from
        FIRST_RETRY_S doubling to refresh_s, jittered so that router replicas do not retry in step."""
        if self.view is not None:
            return self.refresh_s
        doublings = min(max(0, self.failures - 1), 30)  # bounded: 2 ** a day's failures overflows a float
        backoff = min(self.refresh_s, FIRST_RETRY_S * 2 ** doublings)
        return backoff * random.uniform(0.5, 1.0)

    @property
    def age_s(self) -> Optional[float]:
        return None if self.view is None else self.view.age_s
