"""A real browser for the tests: Debian's headless Chromium, driven over the DevTools
protocol on a pipe (`--remote-debugging-pipe`: fd 3 carries commands in, fd 4 answers and
events out, each message NUL-terminated JSON), so no port, no websocket and no race.

    with load(path, screenshot=Path("benchmarks/results/x.png")) as page:
        assert not page.console_errors
        assert page.count("figure.chart svg") == 5

`load` starts one Chromium for one page and hands it over in a `Loaded`, which evaluates in
the live page (`count`, `evaluate`) until it is closed; the browser's process group and
profile directory go on close, when the `Loaded` is dropped, at exit, or when loading fails.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

import pytest

MISSING = "chromium is missing: `make test` installs Debian's chromium"
TIMEOUT_S = 30.0
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--mute-audio"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.fail(MISSING, pytrace=False)


def _url(target: str | Path) -> str:
    if isinstance(target, str) and target.split(":", 1)[0] in ("http", "https", "file", "data", "about"):
        return target
    return Path(target).resolve().as_uri()


def _above_stdio(fd: int) -> int:
    """`fd` moved above 4 (so placing the child's fds 3 and 4 clobbers neither), closed on exec."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


def _stop(process: subprocess.Popen, fds: list[int], profile: str) -> None:
    """Chromium's whole process group (started as its own session), then its pipes and profile."""
    for fd in fds:
        try:
            os.close(fd)  # Chromium shuts down when its DevTools pipe closes
        except OSError:
            pass
    deadline = time.monotonic() + 5
    # Wait for the leader without reaping it, so its group id cannot be reused before the kill.
    while time.monotonic() < deadline and not os.waitid(os.P_PID, process.pid,
                                                         os.WEXITED | os.WNOHANG | os.WNOWAIT):
        time.sleep(0.05)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # what is left: the leader, renderers, helpers
    except ProcessLookupError:
        pass
    process.wait()
    shutil.rmtree(profile, ignore_errors=True)


class _Browser:
    """One Chromium process and its DevTools pipe."""

    def __init__(self):
        binary = chromium()
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        commands_in, self._commands = os.pipe()  # the child reads fd 3
        self._answers, answers_out = os.pipe()  # the child writes fd 4
        commands_in, answers_out = _above_stdio(commands_in), _above_stdio(answers_out)

        def child_pipes():  # in the child, before exec: dup2 leaves 3 and 4 open across it
            os.dup2(commands_in, 3)
            os.dup2(answers_out, 4)

        self.log = Path(self.profile) / "chromium.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=child_pipes, start_new_session=True,
                close_fds=False)  # pass_fds would want 3 and 4 open here; Python's own fds close on exec
        os.close(commands_in)
        os.close(answers_out)
        self._stop = weakref.finalize(self, _stop, self.process, [self._commands, self._answers], self.profile)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def close(self) -> None:
        self._stop()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._answers], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer in time; its log ends:\n{self.log_tail()}")
            chunk = os.read(self._answers, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed its DevTools pipe; its log ends:\n{self.log_tail()}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = TIMEOUT_S) -> dict:
        """The command's result; the events that arrive meanwhile are kept in `events`."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._receive(deadline)
            if answer.get("id") != self._next_id:
                self.events.append(answer)
                continue
            if "error" in answer:
                raise RuntimeError(f"{method}: {answer['error'].get('message')}")
            return answer.get("result", {})

    def wait_event(self, method: str, session: str, since: int, timeout: float = TIMEOUT_S) -> dict:
        """The first `method` event of `session` at or after events[since], waiting for it if needed."""
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            seen = len(self.events)
            self.events.append(self._receive(deadline))


def _console_error(event: dict, urls: dict) -> str | None:
    """What an event says went wrong in the page, or None."""
    method, params = event.get("method"), event.get("params") or {}
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        args = params.get("args") or []
        return "console." + params["type"] + ": " + " ".join(
            str(a.get("value", a.get("description", ""))) for a in args)
    if method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails") or {}
        return "uncaught: " + ((details.get("exception") or {}).get("description") or details.get("text", ""))
    if method == "Log.entryAdded" and (params.get("entry") or {}).get("level") == "error":
        entry = params["entry"]
        return f"{entry.get('source', 'log')}: {entry.get('text', '')} {entry.get('url', '')}".strip()
    if method == "Network.loadingFailed" and not params.get("canceled"):
        return f"failed to load {urls.get(params.get('requestId'), '?')}: {params.get('errorText')}"
    if method == "Network.responseReceived" and (params.get("response") or {}).get("status", 200) >= 400:
        response = params["response"]
        return f"HTTP {response.get('status')} for {response.get('url')}"
    return None


class Loaded:
    """A page Chromium loaded: its DOM after load, what went wrong while loading, the URLs it
    requested, and the live page to evaluate in until `close`."""

    def __init__(self, browser: _Browser, session: str, url: str, load_s: float):
        self._browser, self._session = browser, session
        self.url, self.load_s = url, load_s
        self.dom = self.evaluate("document.documentElement.outerHTML")

    def _seen(self) -> tuple[list[str], list[str]]:
        events = [e for e in self._browser.events if e.get("sessionId") == self._session]
        urls = {e["params"]["requestId"]: e["params"]["request"]["url"]
                for e in events if e.get("method") == "Network.requestWillBeSent"}
        errors = [text for e in events if (text := _console_error(e, urls)) is not None]
        return errors, list(dict.fromkeys(urls.values()))

    @property
    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions, failed loads and HTTP errors seen so far."""
        return self._seen()[0]

    @property
    def requests(self) -> list[str]:
        """Every URL the page requested, the page's own first."""
        return self._seen()[1]

    def evaluate(self, expression: str):
        """The expression's value in the page (JSON-able; promises awaited)."""
        result = self._browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                         "awaitPromise": True}, self._session)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError((details.get("exception") or {}).get("description") or details.get("text"))
        return result.get("result", {}).get("value")

    def count(self, selector: str) -> int:
        return self.evaluate(f"document.querySelectorAll({json.dumps(selector)}).length")

    def screenshot(self, path: Path) -> Path:
        """The viewport as a PNG at `path` (its directory made if needed)."""
        data = self._browser.send("Page.captureScreenshot", {"format": "png"}, self._session)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self._browser.close()

    def __enter__(self) -> Loaded:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(target: str | Path, screenshot: Path | None = None, width: int = 1280, height: int = 2000) -> Loaded:
    """`target` (a file path or a URL) loaded in a fresh headless Chromium with a width x height
    viewport, after its load event and one painted frame; the viewport saved to `screenshot`."""
    started = time.monotonic()
    url = _url(target)
    browser = _Browser()
    try:
        target_id = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target_id, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
        since = len(browser.events)
        navigated = browser.send("Page.navigate", {"url": url}, session)
        if navigated.get("errorText"):
            raise RuntimeError(f"Chromium could not open {url}: {navigated['errorText']}")
        browser.wait_event("Page.loadEventFired", session, since)
        browser.send("Runtime.evaluate", {"expression": "new Promise(r => requestAnimationFrame(() => "
                                                        "requestAnimationFrame(r)))", "awaitPromise": True}, session)
        loaded = Loaded(browser, session, url, time.monotonic() - started)
        if screenshot is not None:
            loaded.screenshot(screenshot)
        return loaded
    except BaseException:
        browser.close()
        raise
