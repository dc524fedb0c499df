"""Admission control: take a request only when it can be answered within the latency bound, and pace the
clients it cannot take instead of inviting them straight back.

Every admitted request gets a deadline, its arrival plus TUNESERVE_MAX_LATENCY_MS; the engine checks the work
against it before decoding, before batching and before answering (service/engine/), so that nothing is decoded
or run for an answer that would come too late.

Admission estimates the work in flight, not only its count: the images admitted and not yet answered, divided
by the rate at which this worker finishes images while it is busy (measured over the last seconds), is when a
new request would be finished. A request is taken when that is within ADMIT_SHARE_OF_BOUND of the bound: the
rest covers the estimate's error, which under overload is large enough that taking work expected to finish
later costs more (decoded, then shed at its deadline) than it serves.

Pacing: a refused request gets its 503 late, not at once (the HTTP edge holds it, service/edges/front.py;
the gRPC edge sleeps). A closed-loop client that resends the moment it is refused otherwise turns each refusal
into another request, and the refusals' own CPU crowds out the work (0.40 of capacity at 256 connections,
docs/benchmarks.md "Goodput under a flood"). A refusal is held at least the latency bound, as long as an
admitted request could have taken; and when many are held, as long as the worker would take to serve one image
for each of them (held / rate), so that the held clients come back at about the rate the worker serves instead
of at the rate refusals can be answered; at most MAX_HOLD_S.
"""
from __future__ import annotations

import collections
import contextlib
import heapq
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from tuneserve.service.engine.errors import RequestError

# A request is admitted when it is expected to be finished within this share of the bound; the rest covers the
# estimate's error (a rate averaged over RATE_WINDOW_S, batches that finish in steps). Measured (2 cores, Lite0,
# docs/benchmarks.md "Goodput under a flood"): at 0.8, an open-loop 4x overload kept 0.75 of capacity (work
# admitted near the bound finished past it and was shed after its decode) and 200s' p99 was 1.16 s; at 0.5, 0.98
# and 1.01 s, with closed-loop goodput the same within noise (1.04 / 0.86 / 0.51 at 64 / 256 / 1,024
# connections against 1.03 / 0.89 / 0.50).
ADMIT_SHARE_OF_BOUND = 0.5
# A request already let in from its headers is refused after its body was read only past this multiple of the
# header-time limit: a second look that refuses what the first let in costs the body's read and the client's
# retry, for a change in the estimate between the two that is mostly noise.
SECOND_LOOK_SLACK = 1.25
RATE_WINDOW_S = 3.0  # completions this recent make the rate: long enough to average batches, short enough to follow load
# The longest a refusal is held (unless the bound is longer: never less than the bound). Under httpx's default
# 5 s read timeout, the shortest common client default, so that a held client gets its 503 and not a timeout
# (which costs it a new connection as well as the retry).
MAX_HOLD_S = 4.0


# How much lower (nice) the decoding threads run than the event loop. On a saturated CPU the event loop then
# still reads, refuses and answers requests on time, instead of queueing them unseen in socket buffers while
# it waits for a core; the decoders lose nothing while any core is free. At 1,024 closed-loop connections on 2
# cores, 0 let /readyz take up to 413 ms (108 with 5) and 15 served 17% fewer images (docs/benchmarks.md).
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

    def late(self, stage: str) -> RequestError:
        """The 503 for a request whose deadline passed at `stage` ("waiting for the model", ...)."""
        bound_ms = 1000 * (self.expires - self.arrived)
        return RequestError(503, f"server overloaded: {self.waited_ms():.0f} ms passed {stage}, over the latency "
                                 f"bound (TUNESERVE_MAX_LATENCY_MS={bound_ms:.0f}); retry shortly", {"Retry-After": "1"})


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


class Pacing:
    """When a refused request is answered: `answer_at(rate)` for each refusal (time.monotonic seconds).
    Event-loop only. Counts the refusals it has timed whose answer is still to come (a client that leaves
    early is still counted until its time: a slight overestimate, on the side of holding longer)."""

    def __init__(self, bound_s: float, clock: Callable[[], float] = time.monotonic, max_hold_s: float = MAX_HOLD_S):
        self.bound_s = bound_s
        self.longest_s = max(bound_s, max_hold_s)
        self.clock = clock
        self._due: list[float] = []  # heap: answer times of the refusals not yet answered

    def held(self) -> int:
        now = self.clock()
        while self._due and self._due[0] <= now:
            heapq.heappop(self._due)
        return len(self._due)

    def answer_at(self, images_per_s: float | None) -> float:
        """The time to answer a refusal made now, given the rate (images/s) this worker serves at, if measured."""
        hold = self.bound_s
        if images_per_s:
            hold = min(max(hold, self.held() / images_per_s), self.longest_s)
        at = self.clock() + hold
        heapq.heappush(self._due, at)
        return at


class Admission:
    """One worker's admission: the work in flight, the latency bound, and the decision for a new request.
    Event-loop only. Made before the engine (the HTTP edge judges requests from their headers with it) and
    handed to it."""

    def __init__(self, bound_s: float, max_in_flight: int, parallelism: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self.bound_s = bound_s
        self.max_in_flight = max_in_flight
        self.clock = clock
        # Under more load than the rate was measured at, a worker goes faster by as many decoding threads as it
        # has, at most (WorkEstimate).
        self.work = WorkEstimate(clock=clock, parallelism=parallelism)
        self.pacing = Pacing(bound_s, clock)

    def deadline(self, arrived: float | None = None) -> Deadline:
        """For a request that arrived at `arrived` (this clock; None: now): answer within the bound of it, or
        not at all."""
        start = self.clock() if arrived is None else arrived
        return Deadline(start, start + self.bound_s)

    def refusal(self, images: int = 1, slack: float = 1.0) -> RequestError | None:
        """The 503 a request of `images` gets now, or None when it is expected to finish within the bound
        (its share, times `slack`) and fits under TUNESERVE_MAX_IN_FLIGHT. The 503 is to be answered at its
        `answer_at`: pacing, see above."""
        in_flight = self.work.in_flight
        over_limit = in_flight + images > self.max_in_flight
        wait = 0.0 if over_limit else self.work.wait_s(images)
        if not over_limit and wait <= slack * ADMIT_SHARE_OF_BOUND * self.bound_s:
            return None
        rate = self.work.rate()
        per_s = rate[0] if rate else None  # images/s, for the message and the pacing alike
        if over_limit:
            message = (f"server overloaded: {in_flight} images are already being processed by this worker (limit "
                       f"TUNESERVE_MAX_IN_FLIGHT={self.max_in_flight}); retry shortly")
        else:
            message = (f"server overloaded: the {in_flight} images in flight (this worker finishes ~{per_s or 0:.0f}/s) "
                       f"would keep this request ~{1000 * wait:.0f} ms, too close to the latency bound "
                       f"(TUNESERVE_MAX_LATENCY_MS={1000 * self.bound_s:.0f}); retry after the Retry-After seconds")
        return RequestError(503, message, {"Retry-After": "1"}, self.pacing.answer_at(per_s))

    @contextlib.contextmanager
    def admitted(self, images: int, slack: float = SECOND_LOOK_SLACK) -> Iterator[None]:
        """Count `images` as in flight while the block runs; RequestError 503 when refusal() says so. The
        default `slack` is for requests the HTTP edge already judged from their headers; the engine cannot
        tell those from others and need not: a request that did not pass the header check is judged here a
        little more leniently, which only matters at the edge of overload."""
        refused = self.refusal(images, slack)
        if refused is not None:
            raise refused
        self.work.started(images)
        served = False
        try:
            yield
            served = True
        finally:
            self.work.finished(images, served)
