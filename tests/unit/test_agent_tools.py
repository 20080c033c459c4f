"""The tools' boundary: CPU-bound work in a child process that a timeout really stops, results
any JSON encoder takes, and http_fetch reaching only allow-listed origins at public addresses."""

import asyncio
import http.server
import json
import os
import threading
import time

import orjson
import pytest

from serve_app.agents.loop import run_agent
from serve_app.agents.tools import (CalculatorArgs, FetchArgs, Session, Tool, ToolError, ToolProcess, calculator,
                                    is_public_address, make_fetch, run_tool)
from serve_app.config import FetchToolConfig
from serve_app.contracts import Generation


CALC = Tool("calculator", CalculatorArgs, calculator)


class Spinner:
    """An engine for the child process whose `spin` never ends by itself."""

    def pid(self) -> int:
        return os.getpid()

    def spin(self):
        while True:
            pass


def test_a_cpu_bound_tool_is_stopped_by_its_timeout_and_the_run_goes_on():
    worker = ToolProcess(Spinner)

    async def spin(args, session):
        return await worker.call("spin")

    replies = iter(['{"tool": "spin", "args": {"expression": "1"}}', '{"answer": "gave up"}'])

    async def generate(conversation, grammar):
        return Generation(next(replies), prompt_tokens=1, completion_tokens=1)

    async def scenario():
        first = await worker.call("pid")
        started = time.perf_counter()
        result = await run_agent("t", [Tool("spin", CalculatorArgs, spin, timeout_s=0.2)], Session(), generate, 3,
                                 time.time() + 10)
        return first, time.perf_counter() - started, result, await worker.call("pid")

    try:
        first, took, result, second = asyncio.run(scenario())
    finally:
        worker.close()
    assert result.answer == "gave up" and "timed out" in result.steps[0]["error"] and took < 1.5
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)  # the overrunning child was killed, not left spinning
    assert second not in (first, os.getpid())  # the next call got a fresh child


def test_the_calculator_answers_from_its_worker_and_refuses_a_hang_at_once():
    async def scenario():
        started = time.perf_counter()
        with pytest.raises(ToolError, match="ndigits"):
            await run_tool(CALC, {"expression": "round(5, -10**64)"}, Session())
        return await run_tool(CALC, {"expression": "6 * 7"}, Session()), time.perf_counter() - started

    answer, took = asyncio.run(scenario())
    assert answer == 42 and took < 2


@pytest.mark.parametrize("expression, result", [
    ("2**70", str(2**70)), ("10**20", "100000000000000000000"), ("2**63", str(2**63)),
    ("2**63 - 1", 2**63 - 1), ("-2**63", -(2**63)), ("1 / 4", 0.25),
])
def test_results_beyond_64_bit_integers_come_back_as_decimal_strings(expression, result):
    got = asyncio.run(run_tool(CALC, {"expression": expression}, Session()))
    assert got == result and orjson.loads(orjson.dumps(got)) == result


def test_every_tool_result_is_made_json_safe():
    async def odd(args, session):
        return {"ratio": float("inf"), "low": float("-inf"), "nan": float("nan"), "nested": [-(2**70), (1, 2.5)]}

    got = asyncio.run(run_tool(Tool("odd", CalculatorArgs, odd), {"expression": "1"}, Session()))
    assert got == {"ratio": "inf", "low": "-inf", "nan": "nan", "nested": [str(-(2**70)), [1, 2.5]]}
    orjson.dumps(got)
    json.dumps(got, allow_nan=False)


# http_fetch


def test_allow_list_entries_are_origins_with_https_443_for_a_bare_host():
    cfg = FetchToolConfig(allowed_hosts=["docs.example.org", "http://Wiki.Example.org", "https://api.example.org:8443",
                                         "https://[2606:4700::1111]"])
    assert cfg.allowed_hosts == ("https://docs.example.org:443", "http://wiki.example.org:80",
                                 "https://api.example.org:8443", "https://[2606:4700::1111]:443")
    for bad in ("docs.example.org:8080", "ftp://docs.example.org", "https://docs.example.org/path",
                "https://user:pw@docs.example.org", "https://"):
        with pytest.raises(ValueError, match="allowed_hosts"):
            FetchToolConfig(allowed_hosts=[bad])


@pytest.mark.parametrize("url, why", [
    ("https://evil.example/x", "not allowed"), ("file:///etc/passwd", "only http"),
    ("http://docs.example.org/x", "not allowed"),  # the entry means https only
    ("https://docs.example.org:8443/x", "not allowed"),  # ...and port 443 only
    ("https://user:pw@docs.example.org/x", "credentials"),
])
def test_fetch_obeys_the_allow_list_by_scheme_host_and_port(url, why):
    with pytest.raises(ToolError, match=why):
        asyncio.run(make_fetch(("docs.example.org",))(FetchArgs(url=url), Session()))


@pytest.mark.parametrize("address, public", [
    ("93.184.216.34", True), ("2606:4700::1111", True), ("::ffff:8.8.8.8", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("100.64.0.1", False),
    ("169.254.169.254", False), ("0.0.0.0", False), ("224.0.0.1", False), ("240.0.0.1", False),
    ("255.255.255.255", False), ("192.0.2.1", False), ("::1", False), ("::", False), ("::ffff:127.0.0.1", False),
    ("::ffff:169.254.169.254", False), ("fe80::1", False), ("fe80::1%1", False), ("fc00::1", False),
    ("fec0::1", False), ("ff0e::1", False), ("2001:db8::1", False), ("2002:7f00:1::", False),
    ("64:ff9b::7f00:1", False), ("not an address", False),
])
def test_only_public_addresses_are_reachable(address, public):
    assert is_public_address(address) is public


class Recorder(http.server.ThreadingHTTPServer):
    """A local HTTP server that records each request's line and headers and answers `reply`."""

    def __init__(self, reply=(200, {}, b"x" * 5000)):
        self.reply, self.seen = reply, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.seen.append((self.requestline, dict(self.headers)))
                status, headers, body = server.reply
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()


@pytest.fixture
def recorder():
    servers = []

    def start(**kwargs):
        servers.append(Recorder(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_fetch_refuses_loopback_even_when_allow_listed(recorder):
    target = recorder()
    for host in ("127.0.0.1", "localhost"):
        url = f"http://{host}:{target.port}/info"
        with pytest.raises(ToolError, match="not a public address"):
            asyncio.run(make_fetch((f"http://{host}:{target.port}",))(FetchArgs(url=url), Session()))
    assert target.seen == []


def test_one_non_public_address_among_several_refuses_the_host():
    async def resolve(host, port):
        return ["93.184.216.34", "10.0.0.7"]

    fetch = make_fetch(("docs.example.org",), resolve=resolve)
    with pytest.raises(ToolError, match="10.0.0.7"):
        asyncio.run(fetch(FetchArgs(url="https://docs.example.org/"), Session()))


def loopback_only(address: str) -> bool:
    """Test-only address rule (make_fetch's keyword; no config reaches it): the local server."""
    return address == "127.0.0.1"


def test_fetch_connects_to_the_address_it_checked(recorder):
    target = recorder()
    lookups = []

    async def resolve(host, port):  # .test never resolves in real DNS: the request must use this answer
        lookups.append((host, port))
        return ["127.0.0.1"]

    fetch = make_fetch((f"http://docs.example.test:{target.port}",), max_bytes=1000, resolve=resolve,
                       allow_address=loopback_only)
    got = asyncio.run(fetch(FetchArgs(url=f"http://docs.example.test:{target.port}/page?q=1"), Session()))
    assert got == {"status": 200, "body": "x" * 1000}
    assert lookups == [("docs.example.test", target.port)]  # resolved once, not again at connect time
    (line, headers), = target.seen
    assert line.startswith("GET /page?q=1 ") and headers["Host"] == f"docs.example.test:{target.port}"


def test_fetch_ignores_proxies_and_netrc_from_the_environment(recorder, monkeypatch, tmp_path):
    target, proxy = recorder(), recorder()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login u password p\nmachine docs.example.test login u password p\n")
    monkeypatch.setenv("NETRC", str(netrc))

    async def resolve(host, port):
        return ["127.0.0.1"]

    fetch = make_fetch((f"http://docs.example.test:{target.port}",), resolve=resolve, allow_address=loopback_only)
    assert asyncio.run(fetch(FetchArgs(url=f"http://docs.example.test:{target.port}/"), Session()))["status"] == 200
    assert proxy.seen == [] and len(target.seen) == 1 and "Authorization" not in target.seen[0][1]


def test_fetch_does_not_follow_a_redirect_and_says_where_it_points(recorder):
    target = recorder(reply=(302, {"Location": "http://169.254.169.254/latest/meta-data"}, b""))

    async def resolve(host, port):
        return ["127.0.0.1"]

    fetch = make_fetch((f"http://docs.example.test:{target.port}",), resolve=resolve, allow_address=loopback_only)
    got = asyncio.run(fetch(FetchArgs(url=f"http://docs.example.test:{target.port}/moved"), Session()))
    assert got == {"status": 302, "location": "http://169.254.169.254/latest/meta-data", "body": ""}
    assert len(target.seen) == 1
    with pytest.raises(ToolError, match="not allowed"):  # following it is another call, checked like any
        asyncio.run(fetch(FetchArgs(url=got["location"]), Session()))
