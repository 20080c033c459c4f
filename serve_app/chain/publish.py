"""`torchrank-miner publish`: make the axon the chain holds for the miner's hotkey the endpoint
the serve config names (subnets[].endpoint), on every subnet where the two differ.

It runs where the wallet lives, not in the Serve application (which only reads the public
hotkey): publishing is an extrinsic signed by the hotkey's secret. The chain rate-limits
serving, so an endpoint already published is never written again. `--dry-run` reads and
compares only: it never loads the secret nor writes.

`publish` holds the logic and takes its reads and writes as functions, so tests run it
without a chain; `run` wires it to the SDK (ChainSource for reads, `client.execute` for
the write).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Optional, Union

from serve_app.chain.metagraph import ChainSource, MetagraphView, SnapshotSource
from serve_app.chain.standing import axon_matches, endpoint_text
from serve_app.config import DEFAULT_HTTP_PORT, MinerConfig, SnapshotMetagraph, SubnetConfig, WalletConfig

# Inclusion and finalization take a few 12 s blocks; past this we stop waiting (it may still land).
WRITE_TIMEOUT_S = 120.0
# Long hex runs (keys, signatures, extrinsic bytes) never reach the output, whatever an error quotes.
_HEX = re.compile(r"(0x)?[0-9a-fA-F]{64,}")

ReadView = Callable[[SubnetConfig], Awaitable[MetagraphView]]
Execute = Callable[[SubnetConfig, object], Awaitable[object]]  # (subnet, intent) -> an ExtrinsicResult


class PublishError(Exception):
    """A write that did not happen, said in one line; code as the CLI's (1: the chain or the config
    said no, 2: it could not get that far)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Outcome:
    netuid: int
    action: str  # skipped, unreadable, not_registered, matches, would_publish, published, failed
    detail: str
    code: int = 0  # the CLI's exit code for it: 0 when nothing went wrong

    @property
    def line(self) -> str:
        return f"subnet {self.netuid}: {self.detail}"


def safe(text: object, limit: int = 300) -> str:
    """One line of an error's text, without anything that could be key material."""
    text = _HEX.sub("<hex>", " ".join(str(text).split()))
    return text[:limit] + ("..." if len(text) > limit else "")


def http_port(source: Union[str, Path]) -> int:
    """The serve config file's top-level http_options.port: Serve's port, the endpoint's default."""
    import yaml

    doc = yaml.safe_load(Path(source).read_text())
    options = doc.get("http_options") if isinstance(doc, dict) else None
    port = options.get("port", DEFAULT_HTTP_PORT) if isinstance(options, dict) else DEFAULT_HTTP_PORT
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"http_options.port: {port!r} is not a TCP port")
    return port


def desired_endpoint(subnet: SubnetConfig, port: int) -> Optional[tuple[str, int]]:
    """(ip, port) the config wants validators to reach; None when the subnet names no endpoint."""
    if subnet.endpoint is None:
        return None
    return subnet.endpoint.ip, subnet.endpoint.port or port


def _write_failure(exc: Exception) -> tuple[str, int]:
    """(what to say, exit code) for an exception out of a write."""
    if isinstance(exc, PublishError):
        return str(exc), exc.code
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return f"timed out: {safe(exc) or 'no answer'}", 2
    from bittensor.result import BittensorError, ChainError, PolicyError, RpcConnectionError

    if isinstance(exc, (ChainError, PolicyError)):
        return f"the chain refused it: {safe(exc)}", 1
    if isinstance(exc, (ConnectionError, OSError, RpcConnectionError)):
        return f"cannot reach the chain: {safe(exc)}", 2
    kind = "" if isinstance(exc, BittensorError) else f"{type(exc).__name__}: "
    return f"{kind}{safe(exc)}", 1


def _refusal(result) -> str:
    error = getattr(result, "error", None)
    message = getattr(error, "message", None) or getattr(result, "message", "") or "no reason given"
    code = getattr(error, "code", None)
    if getattr(code, "name", None) == "RATE_LIMITED":  # serving is rate-limited per hotkey
        message += " (the chain's serving rate limit: wait for its window, then retry)"
    return f"the chain refused it: {safe(message)}"


async def publish_subnet(subnet: SubnetConfig, hotkey: str, port: int, read_view: ReadView,
                         execute: Optional[Execute], dry_run: bool = False) -> Outcome:
    netuid = subnet.netuid
    wanted = desired_endpoint(subnet, port)
    if wanted is None:
        return Outcome(netuid, "skipped", "skipped: no endpoint configured: set subnets[].endpoint.ip")
    ip, port = wanted
    snapshot = isinstance(subnet.metagraph, SnapshotMetagraph)
    where = "the snapshot" if snapshot else "the chain"
    try:
        view = await read_view(subnet)
    except LookupError as exc:  # the subnet does not exist on that network
        return Outcome(netuid, "unreadable", safe(exc), 1)
    except Exception as exc:
        source = f"snapshot {subnet.metagraph.path}" if snapshot else f"chain {subnet.metagraph.network}"
        return Outcome(netuid, "unreadable", f"cannot read the metagraph from {source}: "
                                             f"{type(exc).__name__}: {safe(exc)}", 2)
    me = view.neuron(hotkey)
    if me is None:
        return Outcome(netuid, "not_registered", f"hotkey {hotkey} is not registered on subnet {netuid} "
                                                 f"({where}): register it first", 1)
    held = safe(me.axon, 80) if me.axon else "no axon"
    plan = f"{where} has {held}, the config says {endpoint_text(ip, port)}"
    if axon_matches(me.axon, ip, port):
        return Outcome(netuid, "matches", f"{plan}: matches: nothing to do")
    if dry_run or execute is None:
        return Outcome(netuid, "would_publish", f"{plan}: would publish")
    if snapshot:
        return Outcome(netuid, "failed", f"{plan}: not published: the metagraph is a snapshot "
                                         f"({subnet.metagraph.path}), there is no chain to publish to "
                                         f"(--dry-run shows the plan)", 1)
    from bittensor.intents.serving import ServeAxon

    try:
        result = await execute(subnet, ServeAxon(netuid=netuid, ip=ip, port=port))
    except Exception as exc:
        message, code = _write_failure(exc)
        return Outcome(netuid, "failed", f"{plan}: not published: {message}", code)
    if not getattr(result, "success", False):
        return Outcome(netuid, "failed", f"{plan}: not published: {_refusal(result)}", 1)
    extrinsic = getattr(result, "extrinsic_id", None)
    return Outcome(netuid, "published", f"{plan}: published" + (f" (extrinsic {extrinsic})" if extrinsic else ""))


async def publish(cfg: MinerConfig, port: int, read_view: ReadView, execute: Optional[Execute],
                  dry_run: bool = False, report: Optional[Callable[[Outcome], None]] = None) -> list[Outcome]:
    """Every subnet's outcome, in the config's order; `report` sees each as soon as it is known.
    One subnet failing does not stop the others."""
    hotkey = cfg.wallet.hotkey_ss58()
    outcomes = []
    for subnet in cfg.subnets:
        outcome = await publish_subnet(subnet, hotkey, port, read_view, execute, dry_run)
        outcomes.append(outcome)
        if report is not None:
            report(outcome)
    return outcomes


# --- the SDK behind it -------------------------------------------------------------------------

def sdk_client(network: str):
    import bittensor

    return bittensor.Subtensor(network)


def unlock_hotkey(wallet: WalletConfig, expected_ss58: str):
    """The hotkey's keypair from the wallet on disk (the secret: passed to the SDK, never shown)."""
    if wallet.is_dev_key:
        raise PublishError(f"wallet.uri {wallet.uri} is a public dev key: publishing needs a wallet on disk "
                           f"(wallet.name)", 1)
    import bittensor
    from bittensor.keyfiles import KeyfileError

    where = f"wallet {wallet.name!r}/{wallet.hotkey!r} under {wallet.path}"
    try:
        keypair = bittensor.Wallet(name=wallet.name, hotkey=wallet.hotkey,
                                   path=str(Path(wallet.path).expanduser())).unlock_hotkey()
    except (OSError, KeyfileError) as exc:  # their messages name the file, not its contents
        raise PublishError(f"cannot read the hotkey of {where}: {safe(exc)}") from None
    except Exception as exc:  # a parse error could quote the file: the kind only
        raise PublishError(f"cannot read the hotkey of {where}: {type(exc).__name__} (not a hotkey keyfile?)") from None
    if keypair.ss58_address != expected_ss58:
        raise PublishError(f"the hotkey file of {where} is {keypair.ss58_address}, not the public hotkey "
                           f"{expected_ss58} the miner serves as", 1)
    return keypair


class ChainWriter:
    """Submits an intent signed by the miner's hotkey; the secret is read once, on the first write."""

    def __init__(self, wallet: WalletConfig, hotkey: str, client_factory=None, unlock=None):
        self.wallet, self.hotkey = wallet, hotkey
        self.client_factory = client_factory or sdk_client
        self.unlock = unlock or unlock_hotkey
        self._signer = None
        self._failed: Optional[PublishError] = None

    def signer(self):
        if self._failed is not None:  # one try (one password prompt) for all subnets
            raise self._failed
        if self._signer is None:
            try:
                self._signer = self.unlock(self.wallet, self.hotkey)
            except PublishError as exc:
                self._failed = exc
                raise
        return self._signer

    async def __call__(self, subnet: SubnetConfig, intent):
        signer = self.signer()
        network, timeout_s = subnet.metagraph.network, subnet.metagraph.timeout_s
        client = self.client_factory(network)
        try:
            opened = await asyncio.wait_for(client.__aenter__(), timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            raise PublishError(f"cannot reach {network}: no connection within {timeout_s:g} s") from None
        try:
            return await asyncio.wait_for(opened.execute(intent, signer), WRITE_TIMEOUT_S)
        except (TimeoutError, asyncio.TimeoutError):
            # Submitted, perhaps: a blind retry could hit the serving rate limit.
            raise PublishError(f"no finalization from {network} within {WRITE_TIMEOUT_S:g} s: it may still land; "
                               f"run publish --dry-run before retrying") from None
        finally:
            await client.__aexit__(None, None, None)


async def run(cfg: MinerConfig, port: int, dry_run: bool = False, report=None, client_factory=None,
              unlock=None) -> list[Outcome]:
    """`publish` against the real sources: the snapshot file, or the live metagraph (ChainSource)
    and the SDK's `client.execute` with the wallet's hotkey. Dry run: no writer at all."""
    factory = client_factory or sdk_client

    async def read_view(subnet: SubnetConfig) -> MetagraphView:
        if isinstance(subnet.metagraph, SnapshotMetagraph):
            return SnapshotSource(subnet.metagraph, subnet.netuid).load()
        return await ChainSource(subnet.metagraph, subnet.netuid, client_factory=factory).fetch()

    writer = None if dry_run else ChainWriter(cfg.wallet, cfg.wallet.hotkey_ss58(), factory, unlock)
    return await publish(cfg, port, read_view, writer, dry_run=dry_run, report=report)
