"""Is it earning, end to end on the session's miner: signed traffic reaches the ledger through
the keeper, and `torchrank-miner economics`, `ledger` and `report` read it back for the right
subnet; the public page at `/` shows what validators may see, in a real browser."""

import json
import time
from pathlib import Path

import pytest
import yaml

from serve_app import cli
from tests import browser
from tests.conftest import APP, EPISTULA_NETUID, EPISTULA_PREFIX, ss58, wait_until

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def serve_config(miner, tmp_path_factory):
    """The session app as a serve config file: what the operator's commands read."""
    path = tmp_path_factory.mktemp("economics") / "serve.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"name": APP, "route_prefix": "/",
                                                      "import_path": "serve_app.app:build_app",
                                                      "args": miner.cfg.model_dump(mode="json")}]}))
    return path


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def economics(capsys, serve_config, *extra):
    return json.loads(run(capsys, "economics", "--config", str(serve_config), "--json", *extra))["subnets"]


def settled(capsys, serve_config):
    """The figures once every count already sent has reached the ledger: two reads, a few hand-overs apart, agree."""
    reads = [economics(capsys, serve_config, "--window", "1h")]

    def still():
        time.sleep(2.5)
        reads.append(economics(capsys, serve_config, "--window", "1h"))
        return [r["tasks"] for r in reads[-1].values()] == [r["tasks"] for r in reads[-2].values()]

    wait_until(still, 30, "the ledger settling", interval_s=0)
    return reads[-1]


def test_signed_traffic_shows_up_for_the_right_subnet(miner, serve_config, capsys):
    wait_until(lambda: Path(miner.cfg.ledger.path).exists(), 30, "the keeper creating the ledger")
    # Answering first (the replay store's actor may still be starting when this file runs alone).
    wait_until(lambda: miner.post({"input": "warm"}).status_code == 200, 60, "the miner answering")
    wait_until(lambda: miner.post({"input": "warm"}, path=EPISTULA_PREFIX + "/v1/embeddings",
                                  scheme="epistula").status_code == 200, 60, "the Epistula subnet answering")
    before = settled(capsys, serve_config)
    for i in range(12):
        resp = miner.post({"input": f"economics one {i}"})
        assert resp.status_code == 200, resp.text
    for i in range(5):
        assert miner.post({"input": f"economics six {i}"}, path=EPISTULA_PREFIX + "/v1/embeddings",
                          scheme="epistula").status_code == 200
    assert miner.post({"input": "refused"}, key="//Dave").status_code == 403  # not registered: refused, no task

    def grown():
        now = economics(capsys, serve_config, "--window", "1h")
        return (now["1"]["tasks"] - before["1"]["tasks"] == 12
                and now[str(EPISTULA_NETUID)]["tasks"] - before[str(EPISTULA_NETUID)]["tasks"] == 5
                and now["1"]["refused"].get("not_registered", 0) - before["1"]["refused"].get("not_registered", 0)
                == 1)

    wait_until(grown, 30, lambda: economics(capsys, serve_config, "--window", "1h"))
    one = economics(capsys, serve_config, "--window", "1h")["1"]
    assert one["accepted"] <= one["tasks"] and one["acceptance_rate"] > 0.5
    reward = miner.cfg.subnets[0].reward.per_task_tao * miner.cfg.economics.tao_price
    assert one["revenue"] == pytest.approx(one["accepted"] * reward)
    # The keeper counted what the replicas held: the router and the embeddings share, priced.
    wait_until(lambda: economics(capsys, serve_config, "--window", "1h")["1"]["resource_hours"]
               .get("embeddings", {}).get("cpu", 0) > 0, 30, "held resources in the ledger")
    one = economics(capsys, serve_config, "--window", "1h")["1"]
    assert one["cost"] > 0 and one["profit"] == pytest.approx(one["revenue"] - one["cost"])
    assert one["unit_cost"] == pytest.approx(one["cost"] / one["tasks"])
    text = run(capsys, "economics", "--config", str(serve_config), "--window", "1h")
    assert "subnet 1 over the last 1h" in text and f"subnet {EPISTULA_NETUID}" in text and "USD" in text


def test_the_ledger_holds_today_and_the_verdict_holds(miner, serve_config, capsys):
    data = json.loads(run(capsys, "ledger", "--config", str(serve_config), "--json"))
    today = data["subnets"]["1"]["days"][-1]
    assert today["partial"] and today["requests"] > 0 and today["uptime"] > 0
    assert today["versions"] and today["digests"].get("embeddings")
    verdict = data["subnets"]["1"]["verdict"]
    assert verdict["verdict"] == "hold" and "stable needs 14" in verdict["reasons"][0]
    assert "HOLD" in run(capsys, "ledger", "--config", str(serve_config))


def test_pick_ranks_the_served_subnet_beside_the_candidates(miner, serve_config, capsys):
    result = json.loads(run(capsys, "economics", "--config", str(serve_config), "--pick", "--json"))
    ranked = {r["netuid"]: r for r in result["ranking"]}
    assert {1, EPISTULA_NETUID} <= set(ranked) and ranked[1]["served"]
    assert any(not r["served"] for r in ranked.values())  # the shipped candidates
    # One row per subnet: subnet 1 routes three workloads; only embeddings saw traffic.
    assert ranked[1]["workload"] == "agents, diffusion, embeddings" and "busiest minute" in ranked[1]["capacity_from"]
    assert ranked[1]["demand_per_hour"] > 0 and ranked[1]["tasks_per_hour"] > 0


def test_report_is_drawn_in_a_real_browser(miner, serve_config, tmp_path, capsys):
    out = tmp_path / "report.html"
    run(capsys, "report", "--config", str(serve_config), "--out", str(out))
    with browser.load(out, screenshot=RESULTS / "report-miner.png") as loaded:
        assert loaded.console_errors == []
        assert loaded.count("figure.chart svg") == 2 + 3 * 2  # profit, replicas; three per subnet
        assert loaded.count("section.verdict[data-verdict=hold]") == 2


def test_public_page_in_a_real_browser(miner):
    resp = miner.http.get("/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    info = miner.http.get("/info").json()
    assert info["version"] in resp.text and info["git_sha"] in resp.text
    with browser.load(miner.url + "/", screenshot=RESULTS / "page-miner.png") as loaded:
        assert loaded.console_errors == []
        assert loaded.count("table#availability-1 tr.day") >= 1
        assert loaded.count(f"table#availability-{EPISTULA_NETUID} tr.day") >= 1
        dom = loaded.dom
    assert miner.cfg.wallet.hotkey_ss58() in dom
    for key in ("//Alice", "//Charlie", "//Dave"):  # nothing per validator: no hotkey but the miner's own
        assert ss58(key) not in dom


def test_a_ledger_that_cannot_be_written_does_not_stop_the_keeper(miner):
    import ray

    from serve_app.economics.keeper import LedgerKeeper, config_digest

    cfg = miner.cfg.model_copy(update={"ledger": miner.cfg.ledger.model_copy(
        update={"path": "/proc/no-such-dir/ledger.sqlite"})})
    keeper = LedgerKeeper.options(name="unwritable-ledger", namespace="torchrank").remote(cfg, APP)
    try:
        row = {"netuid": 1, "workload": "embeddings", "requests": 1, "admitted": 1, "answered": 1, "accepted": 1,
               "late": 0, "failed": 0, "miner_failures": 0, "retry_refusals": 0, "egress_bytes": 10, "refused": {},
               "latency": [1]}
        assert ray.get(keeper.add.remote([row], {}, ["v"], {}, config_digest(cfg)), timeout=30) == "unavailable"
        assert ray.get(keeper.add.remote([row], {}, ["v"], {}, "another config"), timeout=30) == "reconfigure"
        assert ray.get(keeper.public_days.remote(14), timeout=30) is None
    finally:
        ray.kill(keeper)
