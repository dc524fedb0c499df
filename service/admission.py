"""Admission control by observed delay: refuse new requests while admitted ones are taking too long.

A fixed in-flight cap (TUNESERVE_MAX_IN_FLIGHT) bounds memory, but not waiting time: on 2 CPU cores 512
images are ~3.5 s of work, so under sustained overload every answer came back seconds late, and images that
waited past the batcher's bound were shed only after being decoded, wasting the CPU that was short already.
This gate follows CoDel's idea: act on a *standing* queue, seen as the smallest delay among the requests that
finished recently. A burst leaves some fast completions and passes; when even the fastest request of the
last `window_s` took longer than the bound, new requests get 503 at once, before their body is read.
"""
from __future__ import annotations

import collections
import time
from typing import Callable


class DelayGate:
    def __init__(self, bound_s: float, window_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.bound_s = bound_s
        self.window_s = window_s
        self.clock = clock
        self._done: collections.deque[tuple[float, float]] = collections.deque()  # (finished at, delay)

    def record(self, admitted_at: float) -> None:
        """A request admitted at `admitted_at` (clock time) has finished, answered or not."""
        now = self.clock()
        self._done.append((now, now - admitted_at))
        self._forget(now)

    def min_recent_delay(self) -> float | None:
        """The smallest delay among requests finished within the window; None when none finished."""
        self._forget(self.clock())
        return min((d for _, d in self._done), default=None)

    def open(self) -> bool:
        delay = self.min_recent_delay()
        return delay is None or delay <= self.bound_s

    def _forget(self, now: float) -> None:
        while self._done and now - self._done[0][0] > self.window_s:
            self._done.popleft()
