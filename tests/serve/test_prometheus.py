"""A real Prometheus server scrapes the session's miner after signed traffic: every
dashboard query and every rule evaluates without error, and the key ones have data."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
DASHBOARD = MONITORING / "grafana" / "torchrank-miner.json"
# Panels that must show data after signed traffic on a CPU miner; the GPU panel must not.
MUST_HAVE_DATA = {"Traffic by outcome (req/s)", "Latency of answered requests", "Error budget remaining (30 d)",
                  "Burn rate", "Auth refusals (req/s)", "Refused by HAProxy at the edge (req/s)", "Queue depth and in-flight",
                  "Batch size (items per forward pass)", "Model time per pass", "Items processed and egress",
                  "Metagraph age", "Build", "Incentive, trust, consensus, rank",
                  "Emission: alpha at the last epoch, TAO a day", "Pruning position, immunity left, free uids",
                  "Registered, uid and axon matches",
                  "Revenue, cost and profit over the last hour, per subnet", "Cost per 1,000 tasks (last hour, last day)",
                  "Acceptance proxy: accepted / admitted tasks (last hour, last day)",
                  "Resources held per workload (CPU and GPU units of RUNNING replicas)"}
ABSENT_ON_CPU = {"GPU utilisation (absent on CPU)"}


@pytest.fixture(scope="module")
def prometheus(miner, tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `make test` installs Debian's prometheus package"
    work = tmp_path_factory.mktemp("prometheus")
    target = miner.metrics_url.split("//")[1].split("/")[0]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in sorted((MONITORING / "rules").glob("*.yml"))],
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [target]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        wait_for(lambda: api.get("/-/ready").status_code == 200, "Prometheus to start")
        yield api
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_for(check, what, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def query(api, expr):
    body = api.get("/api/v1/query", params={"query": expr}).json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def panel_queries():
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):  # a row has none
            yield panel["title"], target["expr"].replace("$netuid", "1").replace("$__rate_interval", "1m")


def test_dashboard_and_rules_work_on_a_scraped_miner(miner, prometheus):
    # Counters must grow while Prometheus watches, or every rate is zero.
    assert miner.post({"input": "first"}).status_code == 200
    wait_for(lambda: query(prometheus, "ray_torchrank_slo_requests_total"), "the first scrape")
    for i in range(6):
        assert miner.post({"input": f"metrics text {i}"}).status_code == 200
    assert miner.post({"input": "x"}, key="//Charlie").status_code == 403
    assert miner.http.post("/v1/embeddings", content=b"{}").status_code == 401

    budget_expr = 'torchrank:slo_error_budget_remaining:30d{netuid="1", slo="availability"}'

    def scraped_all():
        outcomes = {r["metric"]["outcome"] for r in query(prometheus, "ray_torchrank_requests_total")}
        # The two refusals never reached a router: HAProxy answered them at the edge and counted them.
        edge = {r["metric"]["reason"] for r in query(prometheus, "ray_torchrank_edge_refused_total")}
        budget = query(prometheus, budget_expr)  # NaN until the rules see the counters grow
        return ("ok" in outcomes and {"no_validator_permit", "malformed_auth"} <= edge and budget
                and budget[0]["value"][1] != "NaN")

    wait_for(scraped_all, "the miner's metrics and the SLO rules")

    with_data = set()

    def panels_with_data():
        # Rates need two scrapes of a counter: one made by this test may still have one.
        for title, expr in panel_queries():
            if query(prometheus, expr):
                with_data.add(title)
        return MUST_HAVE_DATA <= with_data

    try:
        wait_for(panels_with_data, "the dashboard's key panels", timeout_s=30)
    except AssertionError:
        raise AssertionError(f"no data for {MUST_HAVE_DATA - with_data}") from None
    assert not ABSENT_ON_CPU & with_data, "GPU metrics must be absent on a CPU replica, not zero"

    assert float(query(prometheus, budget_expr)[0]["value"][1]) == 1.0  # no miner-side failure yet

    groups = prometheus.get("/api/v1/rules").json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 20
    broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not broken, broken
