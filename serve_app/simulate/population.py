"""Who sends: the simulated validators of one subnet.

A validator signs with a key the operator holds: a Substrate dev key (//Alice...) found among
the permitted neurons of a snapshot metagraph, or the keys listed in a validators file, for a
miner run on a staging config whose snapshot lists them (the miner admits only the hotkeys its
metagraph permits; nobody holds real validators' keys). Each has its stake (the metagraph's),
its share of the arrivals, its own mix of the subnet's routes, its own deadline (the
X-Bittensor-Timeout it sends), its latency expectation, whether it names the receiver in its
signature (validators seen in the wild often do not) and whether it retries a refusal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from serve_app.config import MinerConfig, SubnetConfig

DEV_URIS = ("//Alice", "//Bob", "//Charlie", "//Dave", "//Eve", "//Ferdie")
# A route's protocol -> the kind of work the simulator sends and checks on it.
KINDS = {"openai-embeddings": "embeddings", "openai-images": "images", "agent-runs": "agents"}
MAX_RETRY_DELAY_S = 5.0  # a Retry-After longer than this is waited only this long


@dataclass(frozen=True)
class Style:
    """How a validator behaves, apart from who it is."""
    mix: dict[str, float]  # kind -> weight; kinds the subnet does not serve are dropped
    timeout_s: float
    receiver: bool
    retries: int
    retry_delay_s: float = 1.0  # when the refusal carries no Retry-After
    share: float = 1.0
    slo_s: Optional[float] = None  # default: the subnet's slo.latency_s


# Styles by stake rank (the top-stake validator first), repeated past the last. The top one
# names the receiver and sends a little of everything with a generous deadline; the others are
# the kinds met in the wild: a tighter deadline and retries; no receiver and a short deadline.
STYLES = (
    Style(mix={"embeddings": 0.8, "images": 0.1, "agents": 0.1}, timeout_s=12.0, receiver=True, retries=0),
    Style(mix={"embeddings": 0.6, "images": 0.4}, timeout_s=6.0, receiver=True, retries=1),
    Style(mix={"embeddings": 1.0}, timeout_s=3.0, receiver=False, retries=1, retry_delay_s=0.5),
)


@dataclass(frozen=True)
class Validator:
    name: str  # what the tables call it: the dev URI or wallet/hotkey
    signer: object  # a bittensor Keypair or Wallet
    hotkey: str
    stake: float
    registered: bool  # in the subnet's metagraph with a validator permit
    share: float  # of the arrival rate, relative to the others
    mix: dict[str, float] = field(default_factory=dict)  # kind -> weight, normalised
    timeout_s: float = 12.0  # its X-Bittensor-Timeout: past it an answer is worth nothing
    slo_s: float = 1.0  # answered within this: full marks for latency
    receiver: bool = True
    retries: int = 0
    retry_delay_s: float = 1.0


class WalletEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    hotkey: str = "default"
    path: str = "~/.bittensor/wallets"


class ValidatorEntry(BaseModel):
    """One validator of a validators file (YAML or JSON: {"validators": [...]})."""
    model_config = ConfigDict(extra="forbid")
    key: Optional[str] = Field(default=None, description="A dev key URI (//Alice); or give wallet.")
    wallet: Optional[WalletEntry] = Field(default=None, description="{name, hotkey, path} of a wallet on disk.")
    stake: Optional[float] = Field(default=None, ge=0, description="Default: the metagraph's.")
    share: Optional[float] = Field(default=None, gt=0)
    mix: Optional[dict[str, float]] = None
    timeout_s: Optional[float] = Field(default=None, gt=0)
    slo_s: Optional[float] = Field(default=None, gt=0)
    receiver: Optional[bool] = None
    retries: Optional[int] = Field(default=None, ge=0, le=5)
    retry_delay_s: Optional[float] = Field(default=None, ge=0)


class ValidatorsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    validators: list[ValidatorEntry] = Field(min_length=1)


def served_kinds(subnet: SubnetConfig) -> dict[str, str]:
    """kind -> the full path of the subnet's route serving it (the first one, if several)."""
    out: dict[str, str] = {}
    for route in subnet.routes:
        kind = KINDS.get(route.protocol)
        if kind is not None:
            out.setdefault(kind, subnet.prefix + route.path)
    return out


def _mix(wanted: dict[str, float], kinds: dict[str, str], strict: bool) -> dict[str, float]:
    """`wanted` over the kinds the subnet serves, normalised. `strict` (a file's mix): none of them
    served is an error; else (a style's) all served kinds evenly."""
    unknown = set(wanted) - set(KINDS.values())
    if unknown:
        raise ValueError(f"mix: {sorted(unknown)} are not kinds of work; use {sorted(KINDS.values())}")
    kept = {k: w for k, w in wanted.items() if k in kinds and w > 0}
    if not kept and strict:
        raise ValueError(f"mix: the subnet serves none of {sorted(wanted)}; it serves {sorted(kinds)}")
    if not kept:
        kept = {k: 1.0 for k in kinds}
    total = sum(kept.values())
    return {k: w / total for k, w in kept.items()}


def _build(name: str, signer, stake: float, registered: bool, style: Style, subnet: SubnetConfig,
           strict_mix: bool = False) -> Validator:
    kinds = served_kinds(subnet)
    return Validator(
        name=name, signer=signer, hotkey=_hotkey(signer), stake=stake, registered=registered, share=style.share,
        mix=_mix(style.mix, kinds, strict_mix), timeout_s=min(style.timeout_s, subnet.max_timeout_s),
        slo_s=style.slo_s if style.slo_s is not None else subnet.slo.latency_s,
        receiver=style.receiver, retries=style.retries, retry_delay_s=style.retry_delay_s)


def _hotkey(signer) -> str:
    import bittensor

    return signer.hotkey.ss58_address if isinstance(signer, bittensor.Wallet) else signer.ss58_address


def dev_population(subnet: SubnetConfig, view) -> list[Validator]:
    """The permitted validators of `view` (a MetagraphView) whose hotkeys are dev keys, by stake."""
    from bittensor.sp_core import Keypair

    found = []
    for uri in DEV_URIS:
        keypair = Keypair.create_from_uri(uri)
        neuron = view.neuron(keypair.ss58_address)
        if neuron is not None and neuron.validator_permit:
            found.append((neuron.stake, uri, keypair))
    found.sort(key=lambda item: (-item[0], item[1]))
    return [_build(uri, keypair, stake, True, STYLES[rank % len(STYLES)], subnet)
            for rank, (stake, uri, keypair) in enumerate(found)]


def file_population(path: Path, subnet: SubnetConfig, view) -> list[Validator]:
    """The validators listed in `path`, in its order; stakes from `view` (None: the file's)."""
    import yaml

    from serve_app.client import signer_for

    try:
        data = ValidatorsFile.model_validate(yaml.safe_load(Path(path).read_text()))
    except OSError as exc:
        raise ValueError(f"cannot read the validators file {path}: {exc.strerror}") from None
    except Exception as exc:  # YAML or schema errors: one line naming the problem
        raise ValueError(f"validators file {path}: {' '.join(str(exc).split())}") from None
    entries = []
    for i, entry in enumerate(data.validators):
        if (entry.key is None) == (entry.wallet is None):
            raise ValueError(f"validators file {path}: validators[{i}]: give exactly one of key or wallet")
        if entry.wallet is not None:
            wallet = entry.wallet
            signer = signer_for(None, wallet.name, wallet.hotkey, wallet.path)
            name = f"{wallet.name}/{wallet.hotkey}"
        else:
            try:
                signer = signer_for(entry.key)
            except Exception as exc:
                raise ValueError(f"validators file {path}: validators[{i}].key: {exc}") from None
            name = entry.key
        try:
            hotkey = _hotkey(signer)
        except Exception as exc:  # a wallet whose hotkey file is missing or unreadable
            raise ValueError(f"validators file {path}: validators[{i}]: cannot read the hotkey of {name}: "
                             f"{' '.join(str(exc).split())}") from None
        neuron = view.neuron(hotkey) if view is not None else None
        stake = entry.stake if entry.stake is not None else (neuron.stake if neuron is not None else 0.0)
        entries.append((i, name, signer, stake, neuron is not None and neuron.validator_permit, entry))
    ranked = sorted(entries, key=lambda e: -e[3])
    out = []
    for rank, (i, name, signer, stake, registered, entry) in enumerate(ranked):
        base = STYLES[rank % len(STYLES)]
        style = Style(**{f: getattr(entry, f) if getattr(entry, f) is not None else getattr(base, f)
                         for f in ("mix", "timeout_s", "receiver", "retries", "retry_delay_s", "share", "slo_s")})
        try:
            out.append((i, _build(name, signer, stake, registered, style, subnet, strict_mix=entry.mix is not None)))
        except ValueError as exc:
            raise ValueError(f"validators file {path}: validators[{i}]: {exc}") from None
    return [v for _, v in sorted(out, key=lambda item: item[0])]


def population(cfg: MinerConfig, subnet: SubnetConfig, validators_file: Optional[Path] = None) -> list[Validator]:
    """The subnet's simulated validators: from `validators_file`, else the snapshot's dev keys."""
    from serve_app.chain.metagraph import SnapshotSource

    view = None
    if subnet.metagraph.source == "snapshot":
        view = SnapshotSource(subnet.metagraph, subnet.netuid).load()
    if validators_file is not None:
        return file_population(validators_file, subnet, view)
    if view is None:
        raise ValueError(f"subnet {subnet.netuid} reads the chain: the simulator signs only with keys held here; "
                         f"list them in a validators file (--validators) and run the miner on a config whose "
                         f"snapshot metagraph permits them")
    found = dev_population(subnet, view)
    if not found:
        raise ValueError(f"subnet {subnet.netuid}'s snapshot has no permitted validator with a dev key "
                         f"({', '.join(DEV_URIS)}): list validators in a file (--validators)")
    return found
