"""A memory budget for the decodes running at once in a worker, and a lane for large images.

An image's decode cost is known from its header (models/image_cost.py): 40 million 16-bit grey pixels need
about 240 MB however small the file. Each decode reserves its bytes here before it enters the thread pool
and returns them when it is done; one that would pass the worker's budget waits, and gives up (503) when
its deadline comes first. Large images (over LARGE_BYTES) also take one of `threads - 1` slots, so at least
one decoding thread is always left for ordinary photos: a client sending huge images does not stall the
others. After a large decode, glibc is asked to hand freed memory back to the system (malloc_trim), so the
worker's resident size returns after a burst instead of staying at its peak.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import functools
import logging
from typing import AsyncIterator

log = logging.getLogger("tuneserve.service")

LARGE_BYTES = 64 * 2**20  # ~20 megapixels of RGB: phone photos decode below this with JPEG draft mode


class DecodeBudgetExceeded(RuntimeError):
    """The request's deadline came while its image waited for decode memory or a large-image slot."""


class DecodeBudget:
    """Event-loop only (no locks): `async with budget.reserve(nbytes, timeout_s): <decode>`."""

    def __init__(self, total_bytes: int, threads: int):
        self.total_bytes = total_bytes
        self.large_slots = max(1, threads - 1)
        self.used = 0
        self.large = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    def _fits(self, nbytes: int) -> bool:
        # A lone image larger than the whole budget may still decode when nothing else does (the per-image
        # limit, TUNESERVE_MAX_DECODE_MB, is what refuses images outright).
        within = self.used + nbytes <= self.total_bytes or self.used == 0
        return within and (nbytes <= LARGE_BYTES or self.large < self.large_slots)

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int, timeout_s: float) -> AsyncIterator[None]:
        large_waiting = nbytes > LARGE_BYTES and any(n > LARGE_BYTES for n, _ in self._waiters)
        if large_waiting or not self._fits(nbytes):
            future = asyncio.get_running_loop().create_future()
            self._waiters.append((nbytes, future))
            try:
                await asyncio.wait_for(future, max(0.0, timeout_s))
            except asyncio.TimeoutError:
                with contextlib.suppress(ValueError):
                    self._waiters.remove((nbytes, future))
                self._wake()
                raise DecodeBudgetExceeded(
                    f"waited for decode memory ({nbytes // 2**20} MiB wanted, {self.used // 2**20} of "
                    f"{self.total_bytes // 2**20} MiB in use)") from None
        else:
            self._take(nbytes)
        try:
            yield
        finally:
            self.used -= nbytes
            if nbytes > LARGE_BYTES:
                self.large -= 1
            self._wake()

    def _take(self, nbytes: int) -> None:
        self.used += nbytes
        if nbytes > LARGE_BYTES:
            self.large += 1

    def _wake(self) -> None:
        """Let in every waiter that fits, in arrival order; large images keep their own order among
        themselves, and one waiting for a large-image slot does not hold up ordinary images behind it."""
        large_blocked = False
        for entry in list(self._waiters):
            nbytes, future = entry
            large = nbytes > LARGE_BYTES
            if future.done():
                self._waiters.remove(entry)
            elif large and large_blocked:
                continue
            elif self._fits(nbytes):
                self._waiters.remove(entry)
                self._take(nbytes)
                future.set_result(None)
            elif large:
                large_blocked = True


@functools.lru_cache(maxsize=1)
def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc: its allocator returns memory its own way
        return None


def release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim; nothing elsewhere)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


M_ARENA_MAX = -8  # glibc's mallopt parameter
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> None:
    """At most MALLOC_ARENAS glibc heaps for the threads created from now on (glibc's default: 8 per core).
    Each decoding and inference thread otherwise gets a heap of its own, whose free space other threads
    cannot reuse: a worker's memory crept up for minutes (+5.9% between the 1st and the 5th minute of a
    soak) and levelled off higher; with 2 heaps it grew 0.7-1.3% over 5 minutes, 20-30 MB lower, at the same
    throughput (docs/benchmarks.md, "Soak")."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
