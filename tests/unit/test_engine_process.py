"""EngineProcess: an engine in a child process behaves like one in this process, and stops for real."""

import os
import threading
import time

import pytest

from serve_app.contracts import DeadlinePassed
from serve_app.engines.base import GeneratingEngine

from serve_app.inference.process import EngineProcess, EngineProcessError


class FakeEngine(GeneratingEngine):
    def __init__(self, scale: int):
        self.scale = scale

    def info(self) -> dict:
        return {"pid": os.getpid(), "scale": self.scale}

    def probe(self) -> None:
        pass

    def generate(self, values):
        print("library noise on stdout must not break the protocol")
        if values == "fail":
            raise ValueError("bad input for the engine")
        if values == "late":
            raise DeadlinePassed()
        if values == "hang":
            time.sleep(60)
        return [v * self.scale for v in values]


@pytest.fixture(scope="module")
def remote():
    engine = EngineProcess(FakeEngine, 3)
    yield engine
    engine.close()


def test_calls_run_in_a_child_process(remote):
    assert remote.info()["pid"] != os.getpid()
    assert remote.generate([1, 2, 3]) == [3, 6, 9] == FakeEngine(3).generate([1, 2, 3])
    remote.probe()


def test_engine_errors_come_back_with_their_type(remote):
    with pytest.raises(ValueError, match="bad input"):
        remote.generate("fail")
    assert remote.generate([2]) == [6]  # and the engine goes on
    with pytest.raises(DeadlinePassed):  # a call the engine stopped part way: the workload answers 504
        remote.generate("late")


def test_the_child_calls_methods_only(remote):
    with pytest.raises(TypeError, match="not a method"):
        remote._call("scale")  # an attribute: refused, not read


def test_only_an_engine_is_hosted():
    with pytest.raises(TypeError, match="GeneratingEngine"):
        EngineProcess(dict)


def test_a_dead_engine_process_is_an_error_not_a_hang():
    engine = EngineProcess(FakeEngine, 1)
    engine.close()
    with pytest.raises(EngineProcessError):
        engine.generate([1])


def test_close_ends_the_child_process():
    engine = EngineProcess(FakeEngine, 1)
    pid = engine.info()["pid"]
    assert pid == engine.pid
    engine.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    engine.close()  # a second close does nothing


def test_close_during_a_call_fails_the_call_at_once():
    engine = EngineProcess(FakeEngine, 1)
    failed = []

    def call():
        try:
            engine.generate("hang")
        except EngineProcessError as exc:
            failed.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.2)
    started = time.perf_counter()
    engine.close()
    caller.join(5)
    assert failed and not caller.is_alive() and time.perf_counter() - started < 5
