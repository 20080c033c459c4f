"""The edge in front of the session's miner, as `make run` has it: HAProxy answers what needs no
signature (deployments/haproxy/edge.cfg) from maps the routers keep (serve_app/router/edge.py).
An answer from a router carries X-Miner-Replica; one from HAProxy does not."""

import socket
from pathlib import Path

import httpx

from tests.conftest import ss58, wait_until
from tests.serve.test_simulate import set_permit

ROUTE = "/v1/embeddings"


def at_edge(response) -> tuple[int, str] | None:
    """(status, error) when HAProxy answered it, None when a router did."""
    if "x-miner-replica" in response.headers:
        return None
    assert response.headers["content-type"] == "application/json"
    return response.status_code, response.json()["error"]


def edge_counts(miner) -> dict:
    return miner.http.get("/info").json()["edge"]["refused_since_haproxy_start"]


def test_what_needs_no_signature_is_refused_by_haproxy_and_counted(miner):
    wait_until(lambda: at_edge(miner.post({"input": "x"}, key="//Dave")) is not None, 30, "the edge's maps filled")
    before = edge_counts(miner)
    h = miner.http
    assert at_edge(h.post(ROUTE, json={"input": "x"})) == (401, "malformed_auth")
    assert at_edge(miner.post({"input": "x"}, key="//Dave")) == (403, "not_registered")
    assert at_edge(miner.post({"input": "x"}, key="//Charlie")) == (403, "no_validator_permit")
    assert at_edge(miner.post({"input": "x"}, key="//Poor")) == (403, "insufficient_stake")
    assert at_edge(miner.post({"input": "x"}, key="//Denied")) == (403, "denied")
    assert at_edge(h.post("/v1/nothing-here", json={})) == (404, "not_found")
    assert at_edge(h.get(ROUTE)) == (405, "method_not_allowed")
    # The Epistula subnet's route wants Epistula's headers: btauth/1 ones are as good as none there.
    assert at_edge(miner.post({"input": "x"}, path="/epistula/v1/embeddings")) == (401, "malformed_auth")
    # What the edge lets through is still the router's to check in full.
    assert at_edge(miner.post({"input": "x"})) is None
    assert at_edge(miner.post({"input": "x"}, key="//Allowed")) is None  # allow-listed, not in the metagraph

    def counted():
        now = edge_counts(miner)
        return all(now.get(code, 0) - before.get(code, 0) >= n for code, n in
                   {"malformed_auth": 2, "not_registered": 1, "no_validator_permit": 1, "insufficient_stake": 1,
                    "denied": 1, "not_found": 1, "method_not_allowed": 1}.items())

    wait_until(counted, 15, lambda: f"HAProxy's counts in /info: {edge_counts(miner)} (before: {before})")


def test_the_edge_follows_a_metagraph_change(miner):
    snapshot, charlie = Path(miner.cfg.subnets[0].metagraph.path), ss58("//Charlie")
    assert at_edge(miner.post({"input": "x"}, key="//Charlie")) == (403, "no_validator_permit")
    set_permit(snapshot, charlie, True)
    try:  # with a permit, Charlie's stake (10) is what keeps him out: the edge says so within a refresh
        wait_until(lambda: at_edge(miner.post({"input": "x"}, key="//Charlie")) == (403, "insufficient_stake"),
                   30, "the edge following the new metagraph")
    finally:
        set_permit(snapshot, charlie, False)
    wait_until(lambda: at_edge(miner.post({"input": "x"}, key="//Charlie")) == (403, "no_validator_permit"),
               30, "the edge following the metagraph back")


def test_a_strangers_address_is_held_to_its_rate_at_the_edge(miner):
    stranger = httpx.Client(base_url=miner.url, timeout=10, transport=httpx.HTTPTransport(local_address="127.0.0.9"))
    limit = miner.cfg.router.edge.stranger_rps * 10  # per 10 s, from an address that never sent a verified request
    answers = [stranger.get("/health") for _ in range(int(limit) + 20)]
    refused = [a for a in answers if a.status_code == 429]
    assert refused and all(at_edge(a) == (429, "rate_limited") and a.headers["retry-after"] == "1" for a in refused)
    assert all(a.status_code == 200 for a in answers[: int(limit) // 2])
    # The validators' address (they sign from 127.0.0.1 in this session) is not held to it.
    assert all(miner.http.get("/health").status_code == 200 for _ in range(int(limit) + 20))


def router_address(miner) -> tuple[str, int]:
    """A Router replica's own port (direct ingress), from HAProxy's config."""
    from serve_app.router.edge import edge_dir
    import ray

    folder = ray.get(ray.remote(lambda: str(edge_dir())).options(num_cpus=0).remote())
    for line in (Path(folder).parent / "haproxy.cfg").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["server"] and "Router" in parts[1]:
            host, port = parts[2].rsplit(":", 1)
            return host, int(port)
    raise AssertionError("no Router server in HAProxy's config")


def test_a_caller_hanging_up_mid_body_is_not_a_miner_failure(miner):
    # Straight to a router (HAProxy holds a body until it is whole and never passes on a half one).
    host, port = router_address(miner)
    before = outcomes(miner)
    for _ in range(3):
        with socket.create_connection((host, port), timeout=5) as conn:
            conn.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"X-Bittensor-Version: 1\r\nX-Bittensor-Hotkey: " + ss58("//Alice").encode() +
                         b"\r\nX-Bittensor-Nonce: 1\r\nX-Bittensor-Signature: 0x00\r\n"
                         b"Content-Length: 4000\r\n\r\n" + b'{"input": "' + b"x" * 100)
    # The router stays up and answers; each ended as the caller's doing (client_disconnected), none as
    # the miner's failure.
    assert miner.post({"input": "after"}).status_code == 200
    wait_until(lambda: outcomes(miner).get("client_disconnected", 0) - before.get("client_disconnected", 0) >= 3,
               15, lambda: f"the routers' outcomes: {outcomes(miner)}")
    assert outcomes(miner).get("internal_error", 0) == before.get("internal_error", 0)


def outcomes(miner) -> dict[str, float]:
    """The routers' torchrank_requests by outcome, summed over replicas and labels."""
    totals: dict[str, float] = {}
    for line in httpx.get(miner.metrics_url, timeout=10).text.splitlines():
        if line.startswith("ray_torchrank_requests_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            totals[outcome] = totals.get(outcome, 0) + float(line.rsplit(" ", 1)[1])
    return totals
