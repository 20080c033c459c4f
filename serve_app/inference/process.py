"""Run an engine in a child process of the replica, called over a pipe.

Why: a small model is mostly Python between short torch ops, so it needs the GIL most of
the time, and in the replica's process the GIL is also wanted by Serve's request handling,
which slows every call (measured with the tiny diffusion pipeline: benchmarks/README.md,
"Diffusion"). In its own process the engine has a GIL to itself; a call costs a pickle of
its arguments and results.

Protocol: length-prefixed pickles on the child's stdin/stdout (the child's own prints go
to stderr). The first message builds the engine; then (method, args) -> ("ok", result) or
("error", exception). Only methods are called, never attributes read. One call at a time:
the replica's engine thread is the only caller. serve_app/agents/tools.py's ToolProcess
speaks the same protocol to its tools.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import Any

from serve_app.engines.base import Engine, GeneratingEngine

_LEN = struct.Struct("<Q")
CLOSE_WAIT_S = 5.0  # for a call in flight to see the child gone and let go of the pipes


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
    return subprocess.Popen([sys.executable, "-m", "serve_app.inference.process"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ))


class EngineProcessError(RuntimeError):
    """The engine process died, could not start, or was closed."""


class EngineProcess(GeneratingEngine):
    """A GeneratingEngine built in a child process: the same methods, each one call over the pipe."""

    def __init__(self, engine_cls: type[Engine], *args: Any):
        if not (isinstance(engine_cls, type) and issubclass(engine_cls, GeneratingEngine)):
            raise TypeError(f"EngineProcess hosts a GeneratingEngine (serve_app/engines/base.py), not {engine_cls!r}: "
                            "subclass it, or run the engine in the replica's process (engine_process: false)")
        self._lock = threading.Lock()
        self._closed = False
        self._proc = spawn()
        self.pid = self._proc.pid
        try:
            self._request(("__init__", (engine_cls.__module__, engine_cls.__qualname__, args)))
        except BaseException:
            self.close()
            raise

    def _request(self, message):
        with self._lock:
            if self._closed:
                raise EngineProcessError(f"engine process (pid {self.pid}) is closed")
            try:
                send_message(self._proc.stdin, message)
                status, value = read_message(self._proc.stdout)
            except (EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
                raise EngineProcessError(f"engine process (pid {self.pid}) failed: {exc}") from None
        if status == "error":
            raise value
        return value

    def _call(self, method: str, *args):
        return self._request((method, args))

    def generate(self, *args) -> list:
        return self._call("generate", *args)

    def decode(self, *args) -> dict:
        return self._call("decode", *args)

    def probe(self) -> None:
        self._call("probe")

    def info(self) -> dict:
        return self._call("info")

    def gpu_usage(self) -> dict:
        return self._call("gpu_usage")

    def close(self) -> None:
        """Kill the child and reap it; a call in flight fails (EngineProcessError). Idempotent."""
        self._closed = True
        self._proc.kill()
        self._proc.wait()
        # The pipes close once no call holds them (a call in flight has just seen EOF).
        if self._lock.acquire(timeout=CLOSE_WAIT_S):
            try:
                for pipe in (self._proc.stdin, self._proc.stdout):
                    try:
                        pipe.close()
                    except OSError:  # unsent bytes of a failed call: nobody reads them now
                        pass
            finally:
                self._lock.release()


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
                function = getattr(engine, method)
                if not callable(function):
                    raise TypeError(f"{type(engine).__name__}.{method} is not a method: the engine process calls "
                                    "methods only")
                result = function(*args)
            send_message(out, ("ok", result))
        except Exception as exc:
            send_message(out, ("error", exc))


if __name__ == "__main__":
    _serve()
