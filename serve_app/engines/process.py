"""Run an engine in a child process of the replica, called over a pipe.

Why: a small model is mostly Python between short torch ops, so it needs the GIL most of
the time, and in the replica's process the GIL is also wanted by Serve's request handling.
Measured with the tiny diffusion pipeline at 8 concurrent requests, calls took 98 ms in
the replica against 65 ms alone (benchmarks/README.md). In its own process the engine has
a GIL to itself; a call costs a pickle of its arguments and results.

Protocol: length-prefixed pickles on the child's stdin/stdout (the child's own prints go
to stderr). The first message builds the engine; then (method, args) -> ("ok", result) or
("error", exception). One call at a time: the replica's engine thread is the only caller.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import Any

_LEN = struct.Struct("<Q")


def send_message(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LEN.pack(len(data)) + data)
    stream.flush()


def read_message(stream):
    head = stream.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError("the engine process closed its pipe")
    (size,) = _LEN.unpack(head)
    return pickle.loads(stream.read(size))


def spawn() -> subprocess.Popen:
    """A child process serving this module's protocol on its stdin/stdout (see _serve)."""
    return subprocess.Popen([sys.executable, "-m", "serve_app.engines.process"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ))


class EngineProcessError(RuntimeError):
    """The engine process died or could not start."""


class EngineProcess:
    """`call(method, *args)` runs on an engine built in a child process (a property is read)."""

    def __init__(self, engine_cls: type, *args: Any):
        self._lock = threading.Lock()
        self._proc = spawn()
        self._request(("__init__", (engine_cls.__module__, engine_cls.__qualname__, args)))

    def _request(self, message):
        with self._lock:
            try:
                send_message(self._proc.stdin, message)
                status, value = read_message(self._proc.stdout)
            except (EOFError, OSError, pickle.UnpicklingError) as exc:
                raise EngineProcessError(f"engine process (pid {self._proc.pid}) failed: {exc}") from None
        if status == "error":
            raise value
        return value

    def call(self, method: str, *args):
        return self._request((method, args))

    def close(self) -> None:
        self._proc.kill()


class InProcessEngine:
    """The same `call` interface over an engine in this process."""

    def __init__(self, engine_cls: type, *args: Any):
        self.engine = engine_cls(*args)

    def call(self, method: str, *args):
        value = getattr(self.engine, method)
        return value(*args) if callable(value) else value


def _serve() -> None:
    # The protocol owns the real stdout; anything the engine's libraries print goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    stdin = sys.stdin.buffer
    engine = None
    while True:
        try:
            method, args = read_message(stdin)
        except EOFError:
            return
        try:
            if method == "__init__":
                import importlib

                module, name, init_args = args
                engine = getattr(importlib.import_module(module), name)(*init_args)
                result = None
            else:
                value = getattr(engine, method)
                result = value(*args) if callable(value) else value  # a method, or a property read
            send_message(out, ("ok", result))
        except Exception as exc:
            send_message(out, ("error", exc))


if __name__ == "__main__":
    _serve()
