"""EngineProcess: an engine in a child process behaves like one in this process."""

import os

import pytest

from serve_app.engines.coalesce import DeadlinePassed
from serve_app.engines.process import EngineProcess, EngineProcessError, InProcessEngine


class FakeEngine:
    def __init__(self, scale: int):
        self.scale = scale

    @property
    def info(self) -> dict:
        return {"pid": os.getpid(), "scale": self.scale}

    def times(self, values: list[int]) -> list[int]:
        print("library noise on stdout must not break the protocol")
        return [v * self.scale for v in values]

    def fail(self):
        raise ValueError("bad input for the engine")

    def late(self):
        raise DeadlinePassed()


@pytest.fixture(scope="module")
def remote():
    engine = EngineProcess(FakeEngine, 3)
    yield engine
    engine.close()


def test_calls_run_in_a_child_process(remote):
    assert remote.call("info")["pid"] != os.getpid()
    assert remote.call("times", [1, 2, 3]) == [3, 6, 9] == InProcessEngine(FakeEngine, 3).call("times", [1, 2, 3])


def test_engine_errors_come_back_with_their_type(remote):
    with pytest.raises(ValueError, match="bad input"):
        remote.call("fail")
    assert remote.call("times", [2]) == [6]  # and the engine goes on
    with pytest.raises(DeadlinePassed):  # a call the engine stopped part way: the workload answers 504
        remote.call("late")


def test_a_dead_engine_process_is_an_error_not_a_hang():
    engine = EngineProcess(FakeEngine, 1)
    engine.close()
    with pytest.raises(EngineProcessError):
        engine.call("times", [1])
