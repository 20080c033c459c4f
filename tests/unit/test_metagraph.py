import asyncio
import json

import pytest
from bittensor.balance import Balance
from bittensor.metagraph import Metagraph, MetagraphNeuron

from serve_app.chain.metagraph import ChainSource, MetagraphCache, SnapshotSource, view_from_sdk
from serve_app.config import ChainMetagraph, SnapshotMetagraph

ALICE = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"


def test_local_snapshot_has_the_dev_keys():
    view = SnapshotSource(SnapshotMetagraph(path="deployments/local-metagraph.json"), 1).load()
    alice = view.neuron(ALICE)
    assert alice.validator_permit and alice.stake == 10000
    charlie = view.neuron("5FLSigC9HGRKVhB9FiEo4Y3koPsNmBmLJbpXg2mp1hXcS59Y")
    assert not charlie.validator_permit and charlie.stake == 10
    assert view.neuron("5DAAnrj7VHTznn2AWBemMuyBwZWs6FNFjdyVXUeYum3PTXFy") is None  # //Dave


def test_snapshot_errors_are_clear(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"netuid": 2, "neurons": []}))
    with pytest.raises(ValueError, match="netuid 2, not 1"):
        SnapshotSource(SnapshotMetagraph(path=str(path)), 1).load()
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read metagraph snapshot"):
        SnapshotSource(SnapshotMetagraph(path=str(path)), 1).load()


def sdk_neuron(uid, hotkey, permit, stake):
    zero = Balance(0)
    return MetagraphNeuron(
        uid=uid, hotkey=hotkey, coldkey=hotkey, active=True, validator_permit=permit, last_update=0,
        block_at_registration=0, rank=0, trust=0, consensus=0, incentive=0, dividends=0, pruning_score=0,
        emission=zero, alpha_stake=zero, tao_stake=zero, total_stake=Balance(int(stake * 1e9), netuid=1),
        axon=None, identity=None, commitment=None,
    )


def sdk_metagraph(neurons):
    return Metagraph(
        netuid=1, mechid=0, name="t", symbol="a", block=42, tempo=360, last_step=0, blocks_since_last_step=0,
        owner_hotkey="", owner_coldkey="", network_registered_at=0, num_uids=len(neurons), max_uids=256,
        price=None, moving_price=None, identity=None, neurons=neurons, commitments={},
        unregistered_commitments={}, raw={},
    )


def test_view_from_the_sdks_metagraph():
    view = view_from_sdk(sdk_metagraph([sdk_neuron(0, ALICE, True, 1234.5)]))
    assert view.block == 42
    assert view.neuron(ALICE).stake == pytest.approx(1234.5)
    assert view.neuron(ALICE).validator_permit


class FakeClient:
    """Stands in for the chain (unreachable here) behind the SDK client's interface."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.subnets = self

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    async def metagraph(self, netuid, commitments=True):
        return await self.behaviour()


def chain_source(behaviour, timeout_s=0.2):
    return ChainSource(ChainMetagraph(timeout_s=timeout_s), 1, client_factory=lambda network: FakeClient(behaviour))


def test_chain_outage_keeps_the_last_good_view():
    state = {"mode": "ok"}

    async def behaviour():
        if state["mode"] == "hang":
            await asyncio.sleep(10)
        if state["mode"] == "error":
            raise ConnectionError("endpoint down")
        if state["mode"] == "gone":
            return None
        return sdk_metagraph([sdk_neuron(0, ALICE, True, 100)])

    async def scenario():
        cache = MetagraphCache(chain_source(behaviour), refresh_s=60)
        assert await cache.refresh()
        good = cache.view
        for mode, message in [("hang", "took over"), ("error", "endpoint down"), ("gone", "does not exist")]:
            state["mode"] = mode
            assert not await cache.refresh()
            assert cache.view is good
            assert message in cache.last_error
        assert cache.failures == 3
        state["mode"] = "ok"
        assert await cache.refresh()
        assert cache.failures == 0 and cache.last_error is None and cache.view is not good

    asyncio.run(scenario())


def test_first_chain_read_failing_leaves_no_view():
    async def down():
        raise ConnectionError("no route to host")

    async def scenario():
        cache = MetagraphCache(chain_source(down), refresh_s=60)
        assert not await cache.refresh()
        return cache

    cache = asyncio.run(scenario())
    assert cache.view is None and cache.age_s is None


def test_background_refresh_picks_up_snapshot_edits(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"netuid": 1, "neurons": []}))

    async def scenario():
        cache = MetagraphCache(SnapshotSource(SnapshotMetagraph(path=str(path)), 1), refresh_s=0.05)
        await cache.refresh()
        cache.start()
        assert cache.view.neuron(ALICE) is None
        path.write_text(json.dumps({"netuid": 1, "neurons": [{"uid": 0, "hotkey": ALICE, "validator_permit": True}]}))
        await asyncio.sleep(0.2)
        await cache.stop()
        return cache.view

    assert asyncio.run(scenario()).neuron(ALICE).validator_permit
