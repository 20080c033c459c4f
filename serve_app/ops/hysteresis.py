"""A switch that follows a condition only once it has held for a while."""

from __future__ import annotations

import time
from typing import Callable, Optional


class Hysteresis:
    """On after a condition has held for `on_after_s`, off after it has been absent for `off_after_s`.

    Used for degradation presets: a burst does not flip them, sustained overload does.
    """

    def __init__(self, on_after_s: float, off_after_s: float, clock: Callable[[], float] = time.monotonic):
        self.on_after_s = on_after_s
        self.off_after_s = off_after_s
        self.clock = clock
        self.on = False
        self._since: Optional[float] = None  # when the condition last started to disagree with `on`

    def update(self, condition: bool) -> bool:
        now = self.clock()
        if condition == self.on:
            self._since = None
            return self.on
        if self._since is None:
            self._since = now
        if now - self._since >= (self.on_after_s if condition else self.off_after_s):
            self.on, self._since = condition, None
        return self.on
