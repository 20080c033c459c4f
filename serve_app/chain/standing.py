"""The miner's own standing on a subnet, read from the metagraph the router already keeps:
what it earns, how the validators rate it, how close it is to being deregistered, and
whether the axon the chain publishes for it is the endpoint it serves on.

What `emission` measures (checked in opentensor/subtensor): the chain writes each uid's
`Emission` when the subnet's epoch runs (`epoch/run_epoch.rs`, from the alpha accumulated
as pending emission since the last epoch, `coinbase/run_coinbase.rs`), and an epoch runs
every `tempo + 1` blocks. So it is the alpha the uid received at the last epoch, not a
per-block rate: a day of 7200 blocks (12 s each) holds 7200 / (tempo + 1) epochs (19.94
at the usual tempo of 360).
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import Optional

from serve_app.chain.metagraph import MetagraphView, Neuron

BLOCKS_PER_DAY = 7200  # 12 s blocks


def epochs_per_day(tempo: int) -> float:
    return BLOCKS_PER_DAY / (tempo + 1)


@dataclass(frozen=True)
class Standing:
    uid: int
    incentive: float
    trust: float
    consensus: float
    rank: float
    dividends: float
    pruning_score: float
    emission_alpha: float  # at the last epoch
    emission_tao: Optional[float]  # the same at the subnet's price; None when the price is unknown
    alpha_per_day: float
    tao_per_day: Optional[float]
    pruning_position: int  # 1: the first deregistered when a registration needs a slot
    pruning_candidates: int  # the neurons ranked (those out of immunity, and this one)
    immunity_blocks_left: Optional[int]  # None when the immunity period is unknown
    free_uids: Optional[int]  # empty slots: while there are any, a registration deregisters nobody
    axon: Optional[str]

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def immune(neuron: Neuron, view: MetagraphView) -> bool:
    if view.immunity_period is None:
        return False
    return view.block - neuron.block_at_registration < view.immunity_period


def pruning_order(neuron: Neuron) -> tuple:
    # The chain deregisters the non-immune neuron with the lowest pruning score (its emission,
    # normalised), the older registration first on a tie, then the lower uid.
    return neuron.pruning_score, neuron.emission, neuron.block_at_registration, neuron.uid


def standing(view: MetagraphView, hotkey: str) -> Optional[Standing]:
    """The standing of `hotkey` on this view's subnet; None when it is not registered there."""
    me = view.neuron(hotkey)
    if me is None:
        return None
    candidates = [n for n in view.neurons.values() if n.hotkey == hotkey or not immune(n, view)]
    position = 1 + sum(1 for n in candidates if n.hotkey != hotkey and pruning_order(n) < pruning_order(me))
    per_day = epochs_per_day(view.tempo)
    tao = None if view.price is None else me.emission * view.price
    immunity_left = (None if view.immunity_period is None
                     else max(0, me.block_at_registration + view.immunity_period - view.block))
    return Standing(
        uid=me.uid, incentive=me.incentive, trust=me.trust, consensus=me.consensus, rank=me.rank,
        dividends=me.dividends, pruning_score=me.pruning_score, emission_alpha=me.emission, emission_tao=tao,
        alpha_per_day=me.emission * per_day, tao_per_day=None if tao is None else tao * per_day,
        pruning_position=position, pruning_candidates=len(candidates), immunity_blocks_left=immunity_left,
        free_uids=None if view.max_uids is None else max(0, view.max_uids - len(view.neurons)),
        axon=me.axon)


def parse_endpoint(text: Optional[str]) -> Optional[tuple[ipaddress._BaseAddress, int]]:
    """("ip:port" or "[ip6]:port") -> (address, port); None for None or anything unparsable."""
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        return ipaddress.ip_address(host.strip("[]")), int(port)
    except ValueError:
        return None


def endpoint_text(ip: str, port: int) -> str:
    """The chain's way of writing an endpoint (the SDK's `MetagraphNeuron.axon`)."""
    address = ipaddress.ip_address(ip)
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def axon_matches(on_chain: Optional[str], ip: str, port: int) -> bool:
    return parse_endpoint(on_chain) == (ipaddress.ip_address(ip), port)
