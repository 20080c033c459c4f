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
        cache = MetagraphCache(chain_source(behaviour), refresh_s=60, max_age_s=600)
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
        cache = MetagraphCache(chain_source(down), refresh_s=60, max_age_s=600)
        assert not await cache.refresh()
        return cache

    cache = asyncio.run(scenario())
    assert cache.view is None and cache.age_s is None


def test_background_refresh_picks_up_snapshot_edits(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"netuid": 1, "neurons": []}))

    async def scenario():
        cache = MetagraphCache(SnapshotSource(SnapshotMetagraph(path=str(path)), 1), refresh_s=0.05,
                               max_age_s=60)
        await cache.refresh()
        cache.start()
        assert cache.view.neuron(ALICE) is None
        path.write_text(json.dumps({"netuid": 1, "neurons": [{"uid": 0, "hotkey": ALICE, "validator_permit": True}]}))
        await asyncio.sleep(0.2)
        await cache.stop()
        return cache.view

    assert asyncio.run(scenario()).neuron(ALICE).validator_permit


class ScriptedSource:
    """Returns (or raises) the scripted results in turn: isolates the cache from any real source."""

    description = "scripted"

    def __init__(self, *results):
        self.results = list(results)
        self.reads = 0

    async def fetch(self):
        self.reads += 1
        result = self.results.pop(0) if len(self.results) > 1 else self.results[0]
        if isinstance(result, Exception):
            raise result
        return result


def view_at(block, fetched_at=None):
    from serve_app.chain.metagraph import MetagraphView, Neuron

    neurons = {ALICE: Neuron(0, ALICE, 100.0, True)}
    return MetagraphView(1, block, neurons) if fetched_at is None else MetagraphView(1, block, neurons, fetched_at)


def test_a_view_past_max_age_stops_authorising_but_stays_visible():
    import time

    from serve_app.config import AuthPolicy
    from serve_app.errors import ApiError
    from serve_app.router.policy import authorise

    cache = MetagraphCache(ScriptedSource(view_at(5, fetched_at=time.time() - 700)), refresh_s=60, max_age_s=600)
    assert asyncio.run(cache.refresh())
    with pytest.raises(ApiError, match="max_age_s") as err:
        authorise(ALICE, cache.view, AuthPolicy())
    assert err.value.status == 503
    authorise(ALICE, cache.view, AuthPolicy(allow_hotkeys=(ALICE,)))
    # /ready, /info and the age metric still see the real (old) view.
    assert cache.view.block == 5 and cache.age_s > 600


def test_metagraph_max_age_must_exceed_refresh():
    from pydantic import ValidationError

    assert ChainMetagraph().max_age_s == 1800 and SnapshotMetagraph(path="x").max_age_s == 1800
    with pytest.raises(ValidationError, match=r"max_age_s \(60\) must be above refresh_s \(120\)"):
        ChainMetagraph(max_age_s=60)


def test_without_a_view_the_cache_retries_fast_with_backoff():
    async def scenario():
        source = ScriptedSource(ConnectionError("down"), view_at(1))
        cache = MetagraphCache(source, refresh_s=60, max_age_s=600)
        assert not await cache.refresh()
        cache.start()
        try:
            for _ in range(40):  # the first retry is within a second, not refresh_s
                if cache.view is not None:
                    break
                await asyncio.sleep(0.05)
        finally:
            await cache.stop()
        return cache

    assert asyncio.run(scenario()).view is not None

    cache = MetagraphCache(ScriptedSource(ConnectionError("down")), refresh_s=60, max_age_s=600)
    for failures, ceiling in [(1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (5000, 60)]:
        cache.failures = failures
        delays = [cache.next_delay_s() for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)  # jittered: replicas do not retry in step
        assert len(set(delays)) > 1
    cache.view = view_at(1)
    assert cache.next_delay_s() == 60  # loaded: the normal period, even while failing


def test_a_view_from_an_older_block_is_refused(caplog):
    async def scenario():
        cache = MetagraphCache(ScriptedSource(view_at(10), view_at(9), view_at(8), view_at(11)), refresh_s=60,
                               max_age_s=600)
        assert await cache.refresh()
        with caplog.at_level("WARNING", logger="ray.serve.torchrank.metagraph"):
            assert not await cache.refresh()
            assert not await cache.refresh()
        assert cache.view.block == 10 and cache.behind_refused == 2
        assert "behind" in cache.last_error
        assert await cache.refresh()
        return cache

    cache = asyncio.run(scenario())
    assert cache.view.block == 11 and cache.last_error is None
    behind = [r for r in caplog.records if "behind" in r.getMessage()]
    assert len(behind) == 1  # once per episode, not once a refresh
