"""Admission control: take a request only when it can be answered within the latency bound.

Every admitted request gets a deadline, its arrival plus TUNESERVE_MAX_LATENCY_MS; the work is checked
against it before decoding, before batching and before answering (service/served_model.py, batcher.py,
routes.py), so that nothing is decoded or run for an answer that would come too late.

Admission itself estimates the work in flight, not only its count: the images admitted and not yet
answered, divided by the rate at which this worker finishes images while it is busy (measured over the
last seconds), is how long a new request would wait. It is refused (503, before its body is read) when
that wait passes half the bound, leaving the other half for its own decoding and inference and for the
estimate's error. Under a flood this keeps the queue short, so admitted requests finish in time and
refusals cost microseconds instead of a decode each.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Callable

# The queue may hold this share of the bound; the rest is the request's own work and the estimate's error.
QUEUE_SHARE_OF_BOUND = 0.3
RATE_WINDOW_S = 3.0  # completions this recent make the rate: long enough to average batches, short enough to follow load


# How much lower (nice) the decoding threads run than the event loop. On a saturated CPU the event loop then
# still reads, refuses and answers requests on time, instead of queueing them unseen in socket buffers while
# it waits for a core; the decoders lose nothing while any core is free.
WORKER_THREAD_NICENESS = 5


def lower_thread_priority() -> None:
    """Run the calling thread WORKER_THREAD_NICENESS below the process (Linux: threads have their own nice
    value); elsewhere, nothing."""
    import os
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + WORKER_THREAD_NICENESS)
    except (AttributeError, OSError):
        pass


@dataclass(frozen=True)
class Deadline:
    """When a request's answer stops being worth computing (time.monotonic seconds)."""

    arrived: float
    expires: float

    def expired(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) > self.expires

    def remaining(self) -> float:
        return self.expires - time.monotonic()

    def waited_ms(self) -> float:
        return 1000 * (time.monotonic() - self.arrived)


class WorkEstimate:
    """Images in flight and the rate at which they finish while the worker is busy -> the wait a new image
    would have. Event-loop only (no locks).

    A rate measured with less work in flight than now understates the worker: one request at a time leaves
    decoding threads and batches unused. It is scaled up by the ratio of the loads, at most by
    `parallelism` (the decoding threads), so that a burst after a quiet spell is judged by what the worker
    can do, while the ramp of a flood is still held back by a bounded guess."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: float = RATE_WINDOW_S,
                 parallelism: float = 2.0):
        self.clock = clock
        self.window_s = window_s
        self.parallelism = max(1.0, parallelism)
        self.in_flight = 0  # images admitted and not finished
        self._mark = clock()  # last completion, or the start of the current busy stretch
        self._changed = self._mark  # last change of in_flight
        self._area = 0.0  # integral of in_flight over time since _mark (image-seconds)
        # Per answer: (finished at, images, busy seconds before it, image-seconds in flight before it), and
        # their sums over the window, kept as they change (admission asks for every request).
        self._done: collections.deque[tuple[float, int, float, float]] = collections.deque()
        self._sums = [0, 0.0, 0.0]

    def _accumulate(self, now: float) -> None:
        self._area += self.in_flight * (now - self._changed)
        self._changed = now

    def started(self, images: int) -> None:
        now = self.clock()
        if self.in_flight == 0:
            self._mark, self._area = now, 0.0  # a busy stretch starts: idle time is not busy time
        self._accumulate(now)
        self.in_flight += images

    def finished(self, images: int, served: bool = True) -> None:
        """`images` left the worker: answered (`served`), or refused after admission (their busy time goes to
        the next answer, so work not done does not make the rate look higher)."""
        now = self.clock()
        self._accumulate(now)
        self.in_flight -= images
        if not served:
            return
        entry = (now, images, now - self._mark, self._area)
        self._done.append(entry)
        self._sums = [self._sums[0] + entry[1], self._sums[1] + entry[2], self._sums[2] + entry[3]]
        self._mark, self._area = now, 0.0
        self._forget(now)

    def rate(self) -> tuple[float, float] | None:
        """(images finished per busy second, mean images in flight meanwhile) over the window; None before
        anything finished."""
        self._forget(self.clock())
        images, busy, area = self._sums
        if images == 0 or busy <= 0:
            return None
        return images / busy, area / busy

    def wait_s(self, images: int = 1) -> float:
        """Estimated seconds until `images` more, queued behind the work in flight, would be finished; 0 when
        there is nothing ahead or nothing measured yet."""
        measured = self.rate()
        if measured is None or self.in_flight == 0:
            return 0.0
        rate, load = measured
        if load < self.in_flight:
            rate *= min(self.in_flight / max(load, 1e-9), self.parallelism)
        return (self.in_flight + images) / rate

    def _forget(self, now: float) -> None:
        while self._done and now - self._done[0][0] > self.window_s:
            _, images, busy, area = self._done.popleft()
            self._sums = [self._sums[0] - images, self._sums[1] - busy, self._sums[2] - area]
        if not self._done:
            self._sums = [0, 0.0, 0.0]  # no drift from float subtraction
