"""`torchrank-miner status` against the session's running miner."""

import json
import threading

from serve_app import cli


def test_status_reports_traffic_latency_budget_and_queues(miner, capsys):
    miner.post({"input": "warm the counters"})
    stop = threading.Event()

    def traffic():
        i = 0
        while not stop.is_set():
            miner.post({"input": f"status text {i}"})
            i += 1

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        assert cli.main(["status", "--metrics", miner.metrics_url, "--interval", "4", "--json"]) == 0
    finally:
        stop.set()
        sender.join()
    report = json.loads(capsys.readouterr().out)
    [row] = [r for r in report["subnets"] if r["netuid"] == "1"]
    assert row["req_per_s"] > 0 and row["ok_share"] > 0.9, row
    assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert row["availability_budget_left"] == 1.0
    assert "embeddings" in report["queue_depth"]

    assert cli.main(["status", "--metrics", miner.metrics_url, "--interval", "0.5"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["netuid", "req/s", "ok"] and "queue depth:" in table


def test_status_skips_an_endpoint_that_does_not_answer(miner, capsys):
    dead = "http://127.0.0.1:9/metrics"
    assert cli.main(["status", "--metrics", dead, "--metrics", miner.metrics_url, "--interval", "0.5", "--json"]) == 0
    out = capsys.readouterr()
    assert f"skipping {dead}" in out.err and json.loads(out.out)["subnets"]


def test_status_without_a_miner_says_so(capsys):
    assert cli.main(["status", "--metrics", "http://127.0.0.1:9/metrics", "--interval", "0"]) == 2
    assert "cannot read the miner's metrics" in capsys.readouterr().err
