"""The status command's arithmetic on hand-written Prometheus text."""

import json
import math

from serve_app.observability.status import as_json, edge_refusals, parse, quantile, render, render_standing, table

LABELS = 'Component="core_worker",application="miner",deployment="Router",replica="r1"'


def exposition(ok: int, refused: int, fast: int, slow: int, slo_errors: int, in_flight: int, queued: int) -> str:
    lines = [
        "# TYPE ray_torchrank_requests_total counter",
        f'ray_torchrank_requests_total{{{LABELS},netuid="1",route="/v1/embeddings",workload="embeddings",outcome="ok",caller="validator"}} {ok}',
        f'ray_torchrank_requests_total{{{LABELS},netuid="1",route="/v1/embeddings",workload="embeddings",outcome="bad_signature",caller="unauthenticated"}} {refused}',
        "# TYPE ray_torchrank_request_seconds histogram",
    ]
    for le, count in (("0.01", fast), ("0.1", fast + slow), ("+Inf", fast + slow)):
        lines.append(f'ray_torchrank_request_seconds_bucket{{{LABELS},netuid="1",route="/v1/embeddings",workload="embeddings",outcome="ok",le="{le}"}} {count}')
    lines += [
        f'ray_torchrank_request_seconds_count{{{LABELS},netuid="1",route="/v1/embeddings",workload="embeddings",outcome="ok"}} {fast + slow}',
        f'ray_torchrank_request_seconds_sum{{{LABELS},netuid="1",route="/v1/embeddings",workload="embeddings",outcome="ok"}} 1.0',
        "# TYPE ray_torchrank_slo_requests_total counter",
        f'ray_torchrank_slo_requests_total{{{LABELS},netuid="1",slo="availability"}} {ok}',
        "# TYPE ray_torchrank_slo_errors_total counter",
        f'ray_torchrank_slo_errors_total{{{LABELS},netuid="1",slo="availability"}} {slo_errors}',
        "# TYPE ray_torchrank_slo_objective gauge",
        f'ray_torchrank_slo_objective{{{LABELS},netuid="1",slo="availability"}} 0.99',
        "# TYPE ray_torchrank_router_in_flight gauge",
        f'ray_torchrank_router_in_flight{{{LABELS},netuid="1"}} {in_flight}',
        "# TYPE ray_torchrank_queue_depth gauge",
        f'ray_torchrank_queue_depth{{{LABELS},workload="embeddings"}} {queued}',
    ]
    return "\n".join(lines) + "\n"


def test_quantile_interpolates_inside_buckets():
    buckets = {0.01: 50.0, 0.1: 100.0, math.inf: 100.0}
    assert quantile(0.5, buckets) == 0.01
    assert math.isclose(quantile(0.75, buckets), 0.055)
    assert math.isnan(quantile(0.5, {}))


def test_rates_and_percentiles_come_from_the_interval():
    before = parse([exposition(ok=100, refused=10, fast=90, slow=10, slo_errors=0, in_flight=0, queued=0)], at=0.0)
    # 10 s later: 40 more ok (20 fast, 20 slow), 10 more refused, one miner-side failure.
    after = parse([exposition(ok=140, refused=20, fast=110, slow=30, slo_errors=1, in_flight=3, queued=7)], at=10.0)
    [row] = table(before, after)
    assert row["netuid"] == "1" and row["req_per_s"] == 5.0 and row["ok_share"] == 0.8
    assert row["latency_window"] == "interval"
    assert math.isclose(row["p50_ms"], 10.0)  # half of the interval's 40 were under 10 ms
    assert 10.0 < row["p95_ms"] <= 100.0
    # 1 error in 140 admitted against a 1 % budget: 1 - (1/140)/0.01 of it is left.
    assert math.isclose(row["availability_budget_left"], 1 - (1 / 140) / 0.01)
    assert math.isnan(row["latency_budget_left"])  # no latency SLO series
    assert row["in_flight"] == 3
    text = render([row], after)
    assert "embeddings 7" in text and "5.00" in text and "28.6%" in text
    assert '"latency_budget_left": null' in as_json([row], after)


def test_quiet_interval_falls_back_to_totals_since_start():
    sample = parse([exposition(ok=100, refused=0, fast=100, slow=0, slo_errors=0, in_flight=0, queued=0)], at=0.0)
    later = parse([exposition(ok=100, refused=0, fast=100, slow=0, slo_errors=0, in_flight=0, queued=0)], at=5.0)
    [row] = table(sample, later)
    assert row["req_per_s"] == 0 and row["latency_window"] == "since start" and row["p99_ms"] <= 10.0


def test_autoscaled_replicas_are_shown_per_deployment():
    text = exposition(ok=1, refused=0, fast=1, slow=0, slo_errors=0, in_flight=0, queued=0) + "\n".join([
        "# TYPE ray_torchrank_autoscaling_desired_replicas gauge",
        'ray_torchrank_autoscaling_desired_replicas{Component="serve_controller",application="miner",deployment="Embeddings"} 3',
    ]) + "\n"
    sample = parse([text], at=1.0)
    assert sample.replicas == {"miner/Embeddings": 3.0}
    assert "autoscaled replicas: miner/Embeddings 3" in render(table(sample, sample), sample)
    assert json.loads(as_json([], sample))["autoscaled_replicas"] == {"miner/Embeddings": 3}
    # Without autoscaling the line is left out.
    assert "autoscaled" not in render([], parse([exposition(1, 0, 1, 0, 0, 0, 0)], at=1.0))


def standing_gauges(netuid: str, replica: str, **values) -> str:
    lines = []
    for name, value in values.items():
        metric = "ray_torchrank_axon_matches" if name == "axon_matches" else f"ray_torchrank_own_{name}"
        lines += [f"# TYPE {metric} gauge",
                  f'{metric}{{Component="core_worker",deployment="Router",replica="{replica}",netuid="{netuid}"}} {value}']
    return "\n".join(lines) + "\n"


def test_each_subnets_standing_is_shown_worst_replica_first():
    text = exposition(ok=1, refused=0, fast=1, slow=0, slo_errors=0, in_flight=0, queued=0)
    standing = dict(registered=1, uid=7, incentive=0.52, tao_per_day=21.241, pruning_position=3,
                    immunity_blocks_left=0, free_uids=251, axon_matches=1)
    # Replica r2 read a newer metagraph: lower incentive, the axon no longer matches.
    texts = [text, standing_gauges("1", "r1", **standing),
             standing_gauges("1", "r2", **{**standing, "incentive": 0.4, "axon_matches": 0}),
             standing_gauges("2", "r1", registered=0, uid=9, incentive=0.0, axon_matches=0)]  # Ray keeps these stale
    sample = parse(texts, at=1.0)
    assert sample.standing["1"]["incentive"] == 0.4 and sample.standing["1"]["axon_matches"] == 0
    out = render(table(sample, sample), sample).splitlines()
    header = out.index(next(line for line in out if line.split()[:3] == ["netuid", "uid", "incentive"]))
    assert out[header + 1].split() == ["1", "7", "0.4000", "21.241", "3", "0", "251", "MISMATCH",
                                       "(torchrank-miner", "publish)"]
    assert "DEREGISTERED" in out[header + 2] and out[header + 2].split()[0] == "2"
    report = json.loads(as_json(table(sample, sample), sample))
    assert report["standing"]["1"]["tao_per_day"] == 21.241 and report["standing"]["2"] == {"registered": 0}
    # A miner whose standing is not exported yet (no metagraph read) shows no standing table.
    assert "incentive" not in render([], parse([text], at=1.0))


def test_a_matching_axon_reads_ok():
    sample = parse([standing_gauges("1", "r1", registered=1, uid=1, axon_matches=1)], at=1.0)
    assert render_standing(sample.standing).splitlines()[1].split()[-1] == "ok"


def metrics_server(text: str):
    """A local /metrics endpoint answering `text`; (url, stop)."""
    import http.server
    import threading

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop():
        server.shutdown()
        server.server_close()

    return f"http://127.0.0.1:{server.server_address[1]}/metrics", stop


def closed_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/metrics"


def test_collect_skips_a_dead_endpoint_with_a_warning_and_says_nothing_when_all_are_dead():
    import httpx
    import pytest

    from serve_app.observability.status import collect

    url, stop = metrics_server(exposition(ok=1, refused=0, fast=1, slow=0, slo_errors=0, in_flight=0, queued=0))
    dead, warnings = closed_url(), []
    try:
        before, after = collect([dead, url], 0, warn=warnings.append)
    finally:
        stop()
    assert before.requests[("1", "ok")] == after.requests[("1", "ok")] == 1
    assert len(warnings) == 2 and all(w.startswith(f"skipping {dead}") for w in warnings)
    warnings.clear()
    with pytest.raises(httpx.HTTPError):
        collect([dead, closed_url()], 0, warn=warnings.append)
    assert warnings == []  # the command says it once


def test_status_command_without_a_miner_is_one_line(tmp_path, capsys, monkeypatch):
    from serve_app import cli
    from serve_app.observability import status

    # A discovery file left by a Ray that has stopped: its endpoints refuse.
    stale = tmp_path / "discovery.json"
    stale.write_text(json.dumps([{"labels": {}, "targets": [closed_url()[len("http://"):-len("/metrics")]] * 2}]))
    monkeypatch.setattr(status.ray_metrics_urls, "__defaults__", (stale,))
    assert cli.main(["status", "--interval", "0"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("torchrank-miner: cannot read the miner's metrics at http://127.0.0.1:") and "refused" in line
    # No Ray at all: no discovery file.
    monkeypatch.setattr(status.ray_metrics_urls, "__defaults__", (tmp_path / "absent.json",))
    assert cli.main(["status", "--interval", "0"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "no local Ray cluster found" in line and "--metrics" in line


def test_what_haproxy_refused_at_the_edge_is_shown_by_reason():
    def edge(not_registered: int, shed: int) -> str:
        return ("# TYPE ray_torchrank_edge_refused_total counter\n"
                f'ray_torchrank_edge_refused_total{{{LABELS},netuid="1",route="/v1/embeddings",reason="not_registered"}} {not_registered}\n'
                f'ray_torchrank_edge_refused_total{{{LABELS},netuid="-",route="unmatched",reason="not_found"}} 3\n'
                f'ray_torchrank_edge_refused_total{{{LABELS},netuid="1",route="/v1/images/generations",reason="shed"}} {shed}\n')

    before, after = parse([edge(100, 0)], at=0.0), parse([edge(5100, 40)], at=10.0)
    refused = edge_refusals(before, after)
    assert refused == {"not_found": {"per_s": 0.0, "total": 3.0}, "not_registered": {"per_s": 500.0, "total": 5100.0},
                       "shed": {"per_s": 4.0, "total": 40.0}}
    assert "not_registered 500.0/s 5100" in render([], after, refused)
    assert json.loads(as_json([], after, refused))["edge_refused"]["shed"]["per_s"] == 4.0
