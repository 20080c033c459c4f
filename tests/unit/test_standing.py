"""The miner's own standing, from snapshots and from the SDK's metagraph (the chain is unreachable
here: the SDK's own MetagraphNeuron/Metagraph types stand in for a live read)."""

import json
from dataclasses import replace

import pytest
from bittensor.balance import Balance
from bittensor.metagraph import Metagraph

from serve_app.chain.metagraph import SnapshotSource, view_from_sdk, view_from_snapshot
from serve_app.chain.standing import axon_matches, endpoint_text, epochs_per_day, parse_endpoint, standing
from serve_app.config import SnapshotMetagraph
from tests.unit import test_metagraph

BOB = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"


def neuron(uid, hotkey, pruning=0.0, registered=0, **kw):
    return {"uid": uid, "hotkey": hotkey, "pruning_score": pruning, "block_at_registration": registered, **kw}


def view(neurons, block=1000, immunity=100, max_uids=None, price=None, tempo=360):
    return view_from_snapshot({"netuid": 1, "block": block, "tempo": tempo, "price": price,
                               "immunity_period": immunity, "max_uids": max_uids, "neurons": neurons}, 1)


def test_the_shipped_snapshot_shows_a_plausible_standing():
    v = SnapshotSource(SnapshotMetagraph(path="deployments/local-metagraph.json"), 1).load()
    own = standing(v, BOB)
    assert own.uid == 1 and 0 < own.incentive < 1 and own.immunity_blocks_left == 0
    assert own.emission_tao == pytest.approx(own.emission_alpha * v.price)
    assert own.tao_per_day == pytest.approx(own.emission_tao * 7200 / 361)
    assert own.pruning_position == 3 and own.free_uids == 249  # uid 2 is immune, uids 3 and 4 earn less
    assert own.axon == "127.0.0.1:8000"


def test_emission_per_epoch_becomes_a_daily_figure_through_the_tempo():
    assert epochs_per_day(360) == pytest.approx(19.94, abs=0.01)
    v = view([neuron(0, BOB, emission=10.0)], tempo=99, price=0.2)
    own = standing(v, BOB)
    assert own.alpha_per_day == pytest.approx(10.0 * 72) and own.tao_per_day == pytest.approx(2.0 * 72)
    assert standing(view([neuron(0, BOB, emission=10.0)]), BOB).emission_tao is None  # no price, no TAO figure


def test_pruning_position_skips_the_immune_and_breaks_ties_like_the_chain():
    neurons = [
        neuron(0, "low-but-immune", pruning=0.0, registered=950),  # 50 blocks old, immunity 100
        neuron(1, BOB, pruning=0.2, registered=500),
        neuron(2, "lower", pruning=0.1, registered=10),
        neuron(3, "tie-older", pruning=0.2, registered=400),  # same score, registered earlier: pruned first
        neuron(4, "tie-newer", pruning=0.2, registered=600),
        neuron(5, "higher", pruning=0.9, registered=10),
    ]
    own = standing(view(neurons, max_uids=6), BOB)
    assert own.pruning_position == 3 and own.pruning_candidates == 5 and own.free_uids == 0


def test_immunity_left_counts_down_from_registration():
    assert standing(view([neuron(0, BOB, registered=950)]), BOB).immunity_blocks_left == 50
    assert standing(view([neuron(0, BOB, registered=950)], block=1100), BOB).immunity_blocks_left == 0
    # A neuron still immune is ranked all the same: its own position is what it will face.
    assert standing(view([neuron(0, BOB, registered=950), neuron(1, "x", pruning=0.5)]), BOB).pruning_position == 1
    assert standing(view([neuron(0, BOB)], immunity=None), BOB).immunity_blocks_left is None


def test_a_hotkey_not_in_the_metagraph_has_no_standing():
    assert standing(view([neuron(0, "someone-else")]), BOB) is None


def test_snapshot_scores_are_fractions():
    with pytest.raises(ValueError, match="incentive"):
        view([neuron(0, BOB, incentive=1.5)])


def test_endpoints_compare_as_addresses():
    assert axon_matches("127.0.0.1:8000", "127.0.0.1", 8000)
    assert not axon_matches("127.0.0.1:8000", "127.0.0.1", 8001)
    assert not axon_matches(None, "127.0.0.1", 8000)
    assert axon_matches("[2001:db8::1]:8091", "2001:db8:0:0::1", 8091)
    assert endpoint_text("2001:db8:0::1", 8091) == "[2001:db8::1]:8091"
    for junk in ("", "no-port", "1.2.3.4:", "1.2.3.4:x", "host:80"):
        assert parse_endpoint(junk) is None


def sdk_neuron(uid, hotkey, **kw):
    return replace(test_metagraph.sdk_neuron(uid, hotkey, False, 0.0), **kw)


def test_the_live_metagraph_carries_the_same_standing():
    me = sdk_neuron(3, BOB, incentive=0.4, trust=0.8, consensus=0.4, rank=0.4, pruning_score=0.3,
                    block_at_registration=700, emission=Balance.from_rao(2_500_000_000, 1, "a"),
                    axon="203.0.113.7:8091")
    graph = Metagraph(netuid=1, mechid=0, name="t", symbol="a", block=1000, tempo=360, last_step=0,
                      blocks_since_last_step=0, owner_hotkey="", owner_coldkey="", network_registered_at=0,
                      num_uids=2, max_uids=2, price=0.1, moving_price=None, identity=None,
                      neurons=[sdk_neuron(0, "other", pruning_score=0.1), me], commitments={},
                      unregistered_commitments={}, raw={"immunity_period": 400})
    own = standing(view_from_sdk(graph), BOB)
    assert own.uid == 3 and own.incentive == 0.4 and own.emission_alpha == 2.5
    assert own.emission_tao == pytest.approx(0.25) and own.immunity_blocks_left == 100
    assert own.pruning_position == 2 and own.free_uids == 0 and own.axon == "203.0.113.7:8091"
    assert json.dumps(own.as_dict())  # /info serialises it
