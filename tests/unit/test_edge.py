"""The edge's state: what the routers turn their metagraph, policy, rates and admission into for
HAProxy's maps, how the leader merges several routers' states, and the runtime API commands.
HAProxy itself answering from these maps is tested for real in tests/serve/test_edge.py."""

import asyncio
import math
import time

from serve_app.chain.metagraph import MetagraphView, Neuron
from serve_app.config import AdmissionConfig, AuthPolicy, EdgeConfig, RateLimitConfig
from serve_app.ops.admission import Admission
from serve_app.ops.ratelimit import RateLimiter
from serve_app.router.edge import (LIVE_S, NEVER_MS, EdgeKeeper, ShedShare, State, changes, hotkey_entries, merge,
                                   parse_counts, parse_map, render, shed_entries)

ALICE, CHARLIE, POOR, OWNER, BANNED = "5Alice", "5Charlie", "5Poor", "5Owner", "5Banned"
VIEW = MetagraphView(netuid=1, block=1, neurons={
    ALICE: Neuron(0, ALICE, 10000.0, True), CHARLIE: Neuron(2, CHARLIE, 10.0, False),
    POOR: Neuron(3, POOR, 5.0, True), BANNED: Neuron(4, BANNED, 9000.0, True)})
POLICY = AuthPolicy(min_stake=100, allow_hotkeys=(OWNER,), deny_hotkeys=(BANNED,))


def test_each_hotkey_gets_the_routers_verdict_its_tier_and_its_rate():
    limiter = RateLimiter(RateLimitConfig(total_rps=100, floor_rps=2, burst_s=2), replicas=2)
    entries = hotkey_entries("app:1", VIEW, POLICY, limiter, rate_limited=True)
    assert entries["app:1/-"] == "loaded"
    assert entries[f"app:1/{CHARLIE}"] == "no_validator_permit"
    assert entries[f"app:1/{POOR}"] == "insufficient_stake"
    assert entries[f"app:1/{BANNED}"] == "denied"
    verdict, tier, per_10s = entries[f"app:1/{ALICE}"].split("|")
    # Alice's share of the permitted stake (10000 of 24005) of 100 req/s, over 10 s plus the burst, with slack.
    rate = 10000 / 24005 * 100
    assert (verdict, tier) == ("ok", "10000") and int(per_10s) >= rate * 12
    assert entries[f"app:1/{OWNER}"].startswith("ok|top|")  # allow-listed: first tier, not limited
    assert "app:1/5Dave" not in entries  # not registered: HAProxy's default answer


def test_a_metagraph_that_is_missing_or_too_old_puts_nothing_in_the_map():
    limiter = RateLimiter(RateLimitConfig())
    old = MetagraphView(netuid=1, block=1, neurons=VIEW.neurons, fetched_at=time.time() - 100, max_age_s=10)
    assert hotkey_entries("app:1", None, POLICY, limiter, True) == {}
    assert hotkey_entries("app:1", old, POLICY, limiter, True) == {}  # the router answers 503 itself


class Route:
    def __init__(self, admission):
        self.admission = admission


def test_shed_entries_name_the_least_deadline_each_tier_could_meet():
    admission = Admission(AdmissionConfig(deadline_share=0.5), in_flight_items=4)
    admission.prior_rate = 10.0  # items per second
    assert shed_entries({"/p": Route(admission)}, [10000.0, 5.0]) == {}  # idle: anyone is admitted

    async def busy():
        holders = [admission.slot(1.0, time.monotonic() + 60, cost=4) for _ in range(3)]
        tasks = [asyncio.ensure_future(holder.__aenter__()) for holder in holders]
        await asyncio.sleep(0)
        # 4 items in flight and 8 queued at stake 1: a lower tier waits behind all 12 (1.2 s at 10/s),
        # a higher one only behind the 4 in flight (0.4 s); with deadline_share 0.5, twice that.
        entries = shed_entries({"/p": Route(admission)}, [10000.0, 0.5])
        admission.cfg = AdmissionConfig(deadline_share=0.5, max_queued=2)
        full = shed_entries({"/p": Route(admission)}, [0.5])
        for task in tasks:
            task.cancel()
        return entries, full

    entries, full = asyncio.run(busy())
    assert entries == {"/p|10000": "800|0", "/p|0": "2400|0"}
    assert full["/p|0"] == f"{NEVER_MS}|0"  # the queue is full: no deadline would do


def state(replica, app="a", replicas=1, at=100.0, **maps):
    return State(replica=replica, app=app, replicas=replicas, at=at, **maps)


def test_the_merged_maps_follow_every_router_and_shed_only_what_all_of_an_apps_routers_would():
    now = 101.0
    states = [state("r1", replicas=2, routes={"/p": "a:1|btauth|12000"}, hotkeys={"a:1/x": "ok|1|9"},
                    shed={"/p|1": "900|100", "/p|5": "100|0"}, trusted={"10.0.0.1": 100.0}),
              state("r2", replicas=2, shed={"/p|1": "700|300"}, trusted={"10.0.0.2": 100.0, "10.0.0.3": now - 7200})]
    maps = merge(states, now, trusted_s=3600)
    assert maps["routes"] == {"/p": "a:1|btauth|12000"} and maps["hotkeys"] == {"a:1/x": "ok|1|9"}
    assert maps["shed"] == {"/p|1": "700|100"}  # the least of the two; /p|5 is shed by one router only
    assert maps["trusted"] == {"10.0.0.1": "1", "10.0.0.2": "1"}  # 10.0.0.3 not seen for two hours
    assert maps["edge"]["on"] == "1"
    # One of the app's two routers silent past FRESH_S: it might take what the other would shed.
    assert merge([states[0], state("r2", replicas=2, at=90.0, shed={"/p|1": "700|0"})], now, 3600)["shed"] == {}
    # Its routes stay until LIVE_S (a busy router's routes do not turn into 404s), then go.
    assert merge([state("r1", at=now - 60, routes={"/p": "x"})], now, 3600)["routes"] == {"/p": "x"}
    assert merge([state("r1", at=now - LIVE_S - 1, routes={"/p": "x"})], now, 3600) == {
        name: {} for name in ("routes", "hotkeys", "trusted", "shed", "edge")}


def test_the_freshest_router_wins_where_two_disagree():
    old = state("old", at=50.0, hotkeys={"a:1/x": "denied"})
    new = state("new", at=100.0, hotkeys={"a:1/x": "ok|1|9"})
    assert merge([new, old], 101.0, 3600)["hotkeys"] == {"a:1/x": "ok|1|9"}


def test_changes_are_the_fewest_runtime_commands():
    assert sorted(changes({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "5", "d": "4"}, "/m")) == [
        "add map /m d 4", "del map /m c", "set map /m b 5"]


def test_haproxys_answers_are_read_back():
    assert parse_map("0x55d1e0 /v1/embeddings a:1|btauth|12000\n0x55d1e1 /x y\n\n") == {
        "/v1/embeddings": "a:1|btauth|12000", "/x": "y"}
    table = ("# table: edge_refused, type: string, size:256, used:2\n"
             "0x7f3c: key=/v1/embeddings|malformed_auth use=0 exp=86399000 shard=0 http_req_cnt=1200\n"
             "0x7f3d: key=-|not_found use=0 exp=86399000 shard=0 http_req_cnt=7\n")
    assert parse_counts(table) == {("/v1/embeddings", "malformed_auth"): 1200, ("-", "not_found"): 7}
    assert render({"b": "2", "a": "1"}) == "a 1\nb 2\n"


def test_the_leaders_report_only_new_refusals_and_a_restarted_haproxy_counts_from_zero():
    reported = []
    table = type("T", (), {"routes": {"/p": object()}})()
    keeper = EdgeKeeper(EdgeConfig(), "a", "r1", 1, table=table, folder=None,
                        on_refused=lambda path, reason, n: reported.append((path, reason, n)))
    answers = iter(["key=/p|shed http_req_cnt=10\nkey=/other-app|shed http_req_cnt=3\nkey=-|not_found http_req_cnt=1",
                    "key=/p|shed http_req_cnt=25\nkey=/other-app|shed http_req_cnt=9\nkey=-|not_found http_req_cnt=2",
                    "key=/p|shed http_req_cnt=4"])

    class Socket:
        async def run(self, commands):
            return next(answers)

    keeper.socket, keeper.app_leader = Socket(), True  # this app's leader, not the node's
    for _ in range(3):
        asyncio.run(keeper._count_refusals())
    # The first read is a baseline; another app's route and paths no route has are not this router's to report.
    assert reported == [("/p", "shed", 15), ("/p", "shed", 4)]
    assert keeper.describe()["refused_since_haproxy_start"] == {"shed": 4}


def test_trusted_addresses_expire():
    now = [1000.0]
    keeper = EdgeKeeper(EdgeConfig(trusted_s=60), "a", "r1", 1, table=type("T", (), {"routes": {}})(), folder=None,
                        clock=lambda: now[0])
    keeper.trust("10.0.0.1")
    keeper.trust(None)  # a request that did not come through HAProxy: nothing to trust
    assert keeper.state().trusted == {"10.0.0.1": 1000.0}
    now[0] += 61
    assert keeper.state().trusted == {}
    assert math.isclose(keeper.state().stranger, EdgeConfig().stranger_rps * 10)


def test_the_shed_share_follows_what_the_router_sheds_and_lets_load_back_in_when_it_stops():
    share = ShedShare()
    key = "/p|10"

    def period(reached: int, shed: int) -> float:
        for i in range(reached):
            share.offered("/p", 10.0, shed=i < shed)
        return share.update().get(key, 0.0)

    # Offered four times what admission takes: the router shed 3 of 4, so the edge sheds ~3 of 4
    # (a little under: the router keeps seeing more than it takes).
    first = period(400, 300)
    assert 0.70 < first < 0.75
    # Then the router sees ~1.15 x what it takes, sheds 13 %: the share holds.
    steady = period(115, 15)
    assert abs(steady - first) < 0.05
    # A period in which the router took all it saw (its queue dipped for a moment) eases the share
    # off; it does not halve it and let twice the load through.
    eased = period(30, 0)
    assert steady * 0.75 < eased < steady
    assert period(115, 15) > eased
    # The load ends: nothing reaches the router, nothing is shed; within 8 periods (2 s) the edge lets all in.
    shares = [period(0, 0) for _ in range(8)]
    assert shares[-1] == 0.0 and shares[0] < first
    assert period(3, 3) == 0.0  # too few to tell


def test_a_long_gone_routers_file_is_removed_and_without_haproxy_the_router_serves_on(tmp_path):
    folder = tmp_path / "torchrank-edge"
    folder.mkdir()
    (folder / "router-gone.json").write_text(state("gone", at=time.time() - LIVE_S - 5).dump())
    keeper = EdgeKeeper(EdgeConfig(), "a", "r1", 1, table=type("T", (), {"routes": {}})(), folder=folder)
    asyncio.run(keeper.sync())  # no admin socket there: counted, logged, nothing raised
    assert sorted(p.name for p in folder.iterdir()) == ["router-r1.json"]
    assert keeper.leader and keeper.errors == 1
