"""`torchrank-miner publish`: the endpoint the config names becomes the hotkey's axon, only where
the chain holds another. No chain: a fake client behind the SDK's interface records the intents."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import bittensor
import pytest
import yaml
from bittensor.balance import Balance
from bittensor.intents.serving import ServeAxon
from bittensor.metagraph import Metagraph, MetagraphNeuron
from bittensor.result import ChainError, ExtrinsicResult
from bittensor.sp_core import Keypair

from serve_app import cli
from serve_app.chain import publish
from serve_app.chain.metagraph import MetagraphView, Neuron
from serve_app.config import DEFAULT_HTTP_PORT, MinerConfig, WalletConfig

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "deployments" / "local.yaml"
SNAPSHOT = REPO / "deployments" / "local-metagraph.json"
BOB = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
ALICE = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("torchrank-miner: ")]
    assert len(lines) == 1, err
    return lines[0]


def subnet_lines(out: str) -> dict[int, str]:
    return {int(m.group(1)): line for line in out.splitlines() if (m := re.match(r"subnet (\d+): ", line))}


def serve_config(tmp_path: Path, args: dict, http_options: dict | None = None) -> Path:
    doc = {"applications": [{"name": "miner", "route_prefix": "/", "import_path": "serve_app.app:build_app",
                             "args": args}]}
    if http_options is not None:
        doc["http_options"] = http_options
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def chain_subnet(netuid: int, prefix: str = "", endpoint: dict | None = None) -> dict:
    subnet = {"netuid": netuid, "prefix": prefix, "metagraph": {"source": "chain", "network": "local", "timeout_s": 2}}
    if endpoint is not None:
        subnet["endpoint"] = endpoint
    return subnet


# --- a wallet on disk and a chain that is not there ---------------------------------------------

@pytest.fixture
def wallet(tmp_path):
    """A wallet with an unencrypted hotkey under tmp_path; (its config section, ss58, its secrets)."""
    mnemonic = Keypair.generate_mnemonic(12)
    path = tmp_path / "wallets"
    bittensor.Wallet(name="miner", hotkey="default", path=str(path)).regenerate_hotkey(mnemonic=mnemonic, suppress=True)
    keyfile = json.loads((path / "miner" / "hotkeys" / "default").read_text())
    secrets = [mnemonic, *(v for k, v in keyfile.items() if k in ("secretSeed", "privateKey"))]
    assert len(secrets) == 3
    return {"name": "miner", "hotkey": "default", "path": str(path)}, keyfile["ss58Address"], secrets


def sdk_neuron(uid: int, hotkey: str, axon: str | None) -> MetagraphNeuron:
    zero = Balance(0)
    return MetagraphNeuron(
        uid=uid, hotkey=hotkey, coldkey=hotkey, active=True, validator_permit=False, last_update=0,
        block_at_registration=0, rank=0, trust=0, consensus=0, incentive=0, dividends=0, pruning_score=0,
        emission=zero, alpha_stake=zero, tao_stake=zero, total_stake=zero, axon=axon, identity=None, commitment=None)


def sdk_metagraph(netuid: int, neurons: list) -> Metagraph:
    return Metagraph(
        netuid=netuid, mechid=0, name="t", symbol="a", block=42, tempo=360, last_step=0, blocks_since_last_step=0,
        owner_hotkey="", owner_coldkey="", network_registered_at=0, num_uids=len(neurons), max_uids=256,
        price=None, moving_price=None, identity=None, neurons=neurons, commitments={},
        unregistered_commitments={}, raw={})


class FakeChain:
    """Per netuid: the axons the chain holds {hotkey: "ip:port" | None} and what execute does
    (an ExtrinsicResult to return, or an exception to raise); records every intent submitted."""

    def __init__(self, axons: dict[int, dict], execute: dict | None = None, read_error: Exception | None = None):
        self.axons, self.execute, self.read_error = axons, execute or {}, read_error
        self.intents, self.signers = [], []

    def client(self, network: str) -> "FakeClient":
        assert network == "local"
        return FakeClient(self)


class FakeClient:
    def __init__(self, chain: FakeChain):
        self.chain = chain
        self.subnets = self

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    async def metagraph(self, netuid, commitments=True):
        if self.chain.read_error is not None:
            raise self.chain.read_error
        axons = self.chain.axons.get(netuid)
        if axons is None:
            return None
        return sdk_metagraph(netuid, [sdk_neuron(uid, hk, axon) for uid, (hk, axon) in enumerate(axons.items())])

    async def execute(self, intent, wallet):
        self.chain.intents.append(intent)
        self.chain.signers.append(wallet)
        outcome = self.chain.execute.get(intent.netuid)
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome == "hang":
            await asyncio.sleep(10)
        if isinstance(outcome, ExtrinsicResult):  # not `or`: a failed result is falsy
            return outcome
        return ExtrinsicResult(success=True, message="ok", extrinsic_id="123-4")


@pytest.fixture
def chain(monkeypatch):
    """Install a FakeChain as the SDK client publish uses: `chain(axons, execute=...)`."""
    def install(*args, **kwargs) -> FakeChain:
        fake = FakeChain(*args, **kwargs)
        monkeypatch.setattr(publish, "sdk_client", fake.client)
        return fake

    return install


@pytest.fixture
def no_secret(monkeypatch):
    """Fail the test if the hotkey's secret is loaded or a chain client is made."""
    def refuse(*args, **kwargs):
        raise AssertionError("the dry run must not load the secret or reach a chain")

    monkeypatch.setattr(publish, "unlock_hotkey", refuse)
    monkeypatch.setattr(publish, "sdk_client", refuse)


# --- snapshots: the shipped local config and a modified one --------------------------------------

def test_dry_run_of_the_shipped_local_config_matches(capsys, no_secret):
    assert cli.main(["publish", "--config", str(LOCAL), "--dry-run"]) == 0
    captured = capsys.readouterr()
    line = subnet_lines(captured.out)[1]
    assert line == "subnet 1: the snapshot has 127.0.0.1:8000, the config says 127.0.0.1:8000: matches: nothing to do"
    assert BOB in captured.out and "dry run" in captured.out
    assert "torchrank-miner:" not in captured.err


def snapshot_config(tmp_path: Path, bob_axon: str | None, endpoint: dict) -> tuple[Path, Path]:
    snap = json.loads(SNAPSHOT.read_text())
    for neuron in snap["neurons"]:
        if neuron["hotkey"] == BOB:
            neuron["axon"] = bob_axon
    snap_path = tmp_path / "metagraph.json"
    snap_path.write_text(json.dumps(snap))
    subnet = {"netuid": 1, "metagraph": {"source": "snapshot", "path": str(snap_path)}, "endpoint": endpoint}
    return serve_config(tmp_path, {"wallet": {"uri": "//Bob"}, "subnets": [subnet]}, {"port": 8000}), snap_path


def test_a_snapshot_axon_that_differs_is_planned_and_nothing_is_written(tmp_path, capsys, no_secret):
    path, snap = snapshot_config(tmp_path, "10.0.0.5:9000", {"ip": "127.0.0.1"})
    before = snap.read_bytes()
    assert cli.main(["publish", "--config", str(path), "--dry-run"]) == 0
    line = subnet_lines(capsys.readouterr().out)[1]
    assert line == "subnet 1: the snapshot has 10.0.0.5:9000, the config says 127.0.0.1:8000: would publish"
    assert snap.read_bytes() == before


def test_without_dry_run_a_snapshot_is_not_pretended_to_be_written(tmp_path, capsys, no_secret):
    path, snap = snapshot_config(tmp_path, None, {"ip": "127.0.0.1", "port": 8091})
    before = snap.read_bytes()
    assert cli.main(["publish", "--config", str(path)]) == 1
    captured = capsys.readouterr()
    line = subnet_lines(captured.out)[1]
    assert "the snapshot has no axon, the config says 127.0.0.1:8091: not published" in line
    assert "there is no chain to publish to" in line and "published (" not in line
    assert one_line(captured.err) == f"torchrank-miner: {line}"
    assert snap.read_bytes() == before


def test_a_subnet_without_an_endpoint_is_skipped(tmp_path, capsys, no_secret):
    path, _ = snapshot_config(tmp_path, "127.0.0.1:8000", {"ip": "127.0.0.1"})
    doc = yaml.safe_load(path.read_text())
    del doc["applications"][0]["args"]["subnets"][0]["endpoint"]
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["publish", "--config", str(path)]) == 0
    assert subnet_lines(capsys.readouterr().out)[1] == (
        "subnet 1: skipped: no endpoint configured: set subnets[].endpoint.ip")


# --- a chain (fake) ------------------------------------------------------------------------------

def test_an_axon_that_differs_is_published_once_with_the_sdks_intent(tmp_path, capsys, wallet, chain):
    section, hotkey, _ = wallet
    fake = chain({1: {ALICE: None, hotkey: "1.2.3.4:8000"}})
    path = serve_config(tmp_path, {"wallet": section, "subnets": [chain_subnet(1, endpoint={"ip": "5.6.7.8",
                                                                                            "port": 8091})]})
    assert cli.main(["publish", "--config", str(path)]) == 0
    assert subnet_lines(capsys.readouterr().out)[1] == (
        "subnet 1: the chain has 1.2.3.4:8000, the config says 5.6.7.8:8091: published (extrinsic 123-4)")
    assert len(fake.intents) == 1
    intent = fake.intents[0]
    assert isinstance(intent, ServeAxon)
    assert (intent.netuid, intent.ip, intent.port, intent.protocol, intent.version) == (1, "5.6.7.8", 8091, 4, 1)
    assert fake.signers[0].ss58_address == hotkey  # signed by the miner's own hotkey


def test_an_axon_that_matches_is_not_written(tmp_path, capsys, wallet, chain, monkeypatch):
    section, hotkey, _ = wallet
    fake = chain({1: {hotkey: "5.6.7.8:8091"}})
    monkeypatch.setattr(publish, "unlock_hotkey", lambda *a: pytest.fail("no write: no secret needed"))
    path = serve_config(tmp_path, {"wallet": section, "subnets": [chain_subnet(1, endpoint={"ip": "5.6.7.8",
                                                                                            "port": 8091})]})
    assert cli.main(["publish", "--config", str(path)]) == 0
    assert subnet_lines(capsys.readouterr().out)[1].endswith("5.6.7.8:8091: matches: nothing to do")
    assert fake.intents == []


def test_dry_run_on_a_chain_reads_it_and_writes_nothing(tmp_path, capsys, wallet, chain, monkeypatch):
    section, hotkey, _ = wallet
    fake = chain({1: {hotkey: None}})
    monkeypatch.setattr(publish, "unlock_hotkey", lambda *a: pytest.fail("the dry run must not load the secret"))
    path = serve_config(tmp_path, {"wallet": section, "subnets": [chain_subnet(1, endpoint={"ip": "5.6.7.8"})]})
    assert cli.main(["publish", "--config", str(path), "--dry-run"]) == 0
    assert subnet_lines(capsys.readouterr().out)[1] == (
        "subnet 1: the chain has no axon, the config says 5.6.7.8:8000: would publish")
    assert fake.intents == []


def test_a_hotkey_not_registered_is_told_to_register(tmp_path, capsys, wallet, chain):
    section, hotkey, _ = wallet
    fake = chain({1: {ALICE: "9.9.9.9:1"}})
    path = serve_config(tmp_path, {"wallet": section, "subnets": [chain_subnet(1, endpoint={"ip": "5.6.7.8"})]})
    assert cli.main(["publish", "--config", str(path)]) == 1
    captured = capsys.readouterr()
    line = subnet_lines(captured.out)[1]
    assert line == f"subnet 1: hotkey {hotkey} is not registered on subnet 1 (the chain): register it first"
    assert one_line(captured.err) == f"torchrank-miner: {line}"
    assert fake.intents == []


def two_subnets(tmp_path, section) -> Path:
    return serve_config(tmp_path, {"wallet": section, "subnets": [
        chain_subnet(1, endpoint={"ip": "5.6.7.8"}), chain_subnet(2, "/sn2", endpoint={"ip": "5.6.7.8"})]})


@pytest.mark.parametrize("outcome, code, said", [
    (ExtrinsicResult(success=False, message="ServingRateLimitExceeded",
                     error=ChainError("ServingRateLimitExceeded", "ServingRateLimitExceeded")),
     1, "not published: the chain refused it: ServingRateLimitExceeded"),
    (ChainError("HotKeyNotRegisteredInSubNet"), 1, "not published: the chain refused it: HotKeyNotRegisteredInSubNet"),
    (ConnectionError("endpoint down"), 2, "not published: cannot reach the chain: endpoint down"),
])
def test_a_failed_write_is_reported_and_the_other_subnets_still_are(tmp_path, capsys, wallet, chain, outcome,
                                                                     code, said):
    section, hotkey, _ = wallet
    fake = chain({1: {hotkey: None}, 2: {hotkey: None}}, execute={1: outcome})
    assert cli.main(["publish", "--config", str(two_subnets(tmp_path, section))]) == code
    captured = capsys.readouterr()
    lines = subnet_lines(captured.out)
    assert said in lines[1]
    assert lines[2].endswith("published (extrinsic 123-4)")
    assert one_line(captured.err) == f"torchrank-miner: {lines[1]}"
    assert [i.netuid for i in fake.intents] == [1, 2]


def test_a_rate_limited_refusal_says_so(tmp_path, capsys, wallet, chain):
    section, hotkey, _ = wallet
    refused = ExtrinsicResult(success=False, message="Transaction would exhaust the serving rate limit",
                              error=ChainError("ServingRateLimitExceeded", "ServingRateLimitExceeded"))
    if getattr(refused.error.code, "name", None) != "RATE_LIMITED":
        pytest.skip("this SDK does not classify ServingRateLimitExceeded as rate-limited")
    chain({1: {hotkey: None}}, execute={1: refused})
    path = serve_config(tmp_path, {"wallet": section, "subnets": [chain_subnet(1, endpoint={"ip": "5.6.7.8"})]})
    assert cli.main(["publish", "--config", str(path)]) == 1
    assert "serving rate limit" in subnet_lines(capsys.readouterr().out)[1]


def test_a_write_without_an_answer_may_still_land(tmp_path, capsys, wallet, chain, monkeypatch):
    section, hotkey, _ = wallet
    monkeypatch.setattr(publish, "WRITE_TIMEOUT_S", 0.1)
    chain({1: {hotkey: None}}, execute={1: "hang"})
    path = serve_config(tmp_path, {"wallet": section, "subnets": [chain_subnet(1, endpoint={"ip": "5.6.7.8"})]})
    assert cli.main(["publish", "--config", str(path)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "no finalization from local within 0.1 s: it may still land" in line and "--dry-run" in line


def test_a_chain_that_cannot_be_read(tmp_path, capsys, wallet, chain):
    section, _, _ = wallet
    fake = chain({}, read_error=ConnectionError("no route to host"))
    assert cli.main(["publish", "--config", str(two_subnets(tmp_path, section))]) == 2
    lines = subnet_lines(capsys.readouterr().out)
    assert all("cannot read the metagraph from chain local: ConnectionError: no route to host" in lines[n]
               for n in (1, 2))
    assert fake.intents == []


def test_a_subnet_that_does_not_exist(tmp_path, capsys, wallet, chain):
    section, hotkey, _ = wallet
    chain({1: {hotkey: None}})
    assert cli.main(["publish", "--config", str(two_subnets(tmp_path, section))]) == 1
    lines = subnet_lines(capsys.readouterr().out)
    assert lines[1].endswith("published (extrinsic 123-4)")
    assert lines[2] == "subnet 2: subnet 2 does not exist on local"


def test_an_unreadable_hotkey_secret_is_tried_once_and_reported_for_each_subnet(tmp_path, capsys, wallet, chain):
    section, hotkey, _ = wallet
    (Path(section["path"]) / "miner" / "hotkeys" / "default").unlink()  # the public hotkey file stays
    fake = chain({1: {hotkey: None}, 2: {hotkey: None}})
    assert cli.main(["publish", "--config", str(two_subnets(tmp_path, section))]) == 2
    lines = subnet_lines(capsys.readouterr().out)
    for n in (1, 2):
        assert "not published: cannot read the hotkey of wallet 'miner'/'default'" in lines[n]
    assert fake.intents == []


def test_a_hotkey_file_of_another_key_is_refused(tmp_path, capsys, wallet, chain):
    section, hotkey, _ = wallet
    wallets = Path(section["path"])
    bittensor.Wallet(name="other", hotkey="default", path=str(wallets)).regenerate_hotkey(
        mnemonic=Keypair.generate_mnemonic(12), suppress=True)
    # The secret file replaced by another key's; the public hotkey file stays the miner's.
    (wallets / "miner" / "hotkeys" / "default").write_bytes((wallets / "other" / "hotkeys" / "default").read_bytes())
    fake = chain({1: {hotkey: None}})
    path = serve_config(tmp_path, {"wallet": section, "subnets": [chain_subnet(1, endpoint={"ip": "5.6.7.8"})]})
    assert cli.main(["publish", "--config", str(path)]) == 1
    assert f"not the public hotkey {hotkey}" in one_line(capsys.readouterr().err)
    assert fake.intents == []


def test_no_secret_reaches_the_output(tmp_path, capsys, wallet, chain):
    section, hotkey, secrets = wallet
    leaky = ExtrinsicResult(success=False, message=f"Invalid extrinsic 0x{'ab' * 80} rejected")
    chain({1: {hotkey: "1.2.3.4:1"}, 2: {hotkey: None}}, execute={2: leaky})
    assert cli.main(["publish", "--config", str(two_subnets(tmp_path, section))]) == 1
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "<hex>" in text and "abab" not in text
    for secret in secrets:
        assert secret.removeprefix("0x") not in text
    words = secrets[0].split()
    assert not any(f"{a} {b}" in text for a, b in zip(words, words[1:]))
    assert not re.search(r"[0-9a-fA-F]{64}", text)
    assert not re.search(r"mnemonic|private|secret|seed", text.replace(str(tmp_path), ""), re.IGNORECASE)


# --- endpoints: IPv6 and the default port ---------------------------------------------------------

def run_publish(cfg: MinerConfig, held: dict[int, str | None], port: int = DEFAULT_HTTP_PORT, dry_run=False):
    """The logic alone: a view per netuid holding `held` as the miner's axon, a recording executor."""
    hotkey = cfg.wallet.hotkey_ss58()
    intents = []

    async def read_view(subnet):
        return MetagraphView(subnet.netuid, 1, {hotkey: Neuron(1, hotkey, 0.0, False, axon=held[subnet.netuid])})

    async def execute(subnet, intent):
        intents.append(intent)
        return ExtrinsicResult(success=True, extrinsic_id="7-1")

    return asyncio.run(publish.publish(cfg, port, read_view, execute, dry_run=dry_run)), intents


def miner(*endpoints: dict, wallet: dict | None = None) -> MinerConfig:
    return MinerConfig.model_validate({"wallet": wallet or {"name": "miner"}, "subnets": [
        chain_subnet(i + 1, f"/sn{i + 1}" if i else "", endpoint=e) for i, e in enumerate(endpoints)]})


def test_ipv6_endpoints_are_written_and_compared_like_the_chain(monkeypatch):
    monkeypatch.setattr(WalletConfig, "hotkey_ss58", lambda self: BOB)
    cfg = miner({"ip": "2001:0db8:0:0::1", "port": 8091}, {"ip": "2001:db8::1", "port": 8091})
    outcomes, intents = run_publish(cfg, {1: "[2001:db8::1]:8091", 2: "[2001:db8::2]:8091"})
    assert outcomes[0].line == ("subnet 1: the chain has [2001:db8::1]:8091, the config says [2001:db8::1]:8091: "
                                "matches: nothing to do")
    assert outcomes[1].line == ("subnet 2: the chain has [2001:db8::2]:8091, the config says [2001:db8::1]:8091: "
                                "published (extrinsic 7-1)")
    assert [(i.netuid, i.ip, i.port, i.protocol) for i in intents] == [(2, "2001:db8::1", 8091, 4)]
    # An IPv4 axon never matches an IPv6 endpoint, whatever the port.
    outcomes, intents = run_publish(cfg, {1: "1.2.3.4:8091", 2: None}, dry_run=True)
    assert [o.action for o in outcomes] == ["would_publish", "would_publish"] and intents == []


def test_the_port_defaults_to_http_options(tmp_path, monkeypatch):
    monkeypatch.setattr(WalletConfig, "hotkey_ss58", lambda self: BOB)
    path = serve_config(tmp_path, {"wallet": {"name": "miner"}, "subnets": []}, {"host": "0.0.0.0", "port": 8091})
    assert publish.http_port(path) == 8091
    assert publish.http_port(serve_config(tmp_path, {}, None)) == DEFAULT_HTTP_PORT == 8000
    assert publish.http_port(serve_config(tmp_path, {}, {"host": "0.0.0.0"})) == 8000
    with pytest.raises(ValueError, match="http_options.port"):
        publish.http_port(serve_config(tmp_path, {}, {"port": "eighty"}))
    cfg = miner({"ip": "5.6.7.8"}, {"ip": "5.6.7.8", "port": 9000})
    outcomes, intents = run_publish(cfg, {1: "5.6.7.8:8091", 2: "5.6.7.8:8091"}, port=8091)
    assert outcomes[0].action == "matches"  # no port: http_options.port
    assert outcomes[1].line.endswith("the config says 5.6.7.8:9000: published (extrinsic 7-1)")
    assert [(i.netuid, i.port) for i in intents] == [(2, 9000)]


def test_the_cli_reads_the_port_from_the_serve_config(tmp_path, capsys, wallet, chain):
    section, hotkey, _ = wallet
    chain({1: {hotkey: "5.6.7.8:8000"}})
    path = serve_config(tmp_path, {"wallet": section, "subnets": [chain_subnet(1, endpoint={"ip": "5.6.7.8"})]},
                        {"host": "0.0.0.0", "port": 8091})
    assert cli.main(["publish", "--config", str(path), "--dry-run"]) == 0
    assert subnet_lines(capsys.readouterr().out)[1] == (
        "subnet 1: the chain has 5.6.7.8:8000, the config says 5.6.7.8:8091: would publish")


def test_a_dev_key_never_signs_a_write():
    cfg = MinerConfig.model_validate({"wallet": {"uri": "//Bob"}, "subnets": [
        {"netuid": 1, "metagraph": {"source": "snapshot", "path": str(SNAPSHOT)}}]})
    with pytest.raises(publish.PublishError, match="public dev key") as err:
        publish.unlock_hotkey(cfg.wallet, BOB)
    assert err.value.code == 1
