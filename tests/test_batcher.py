"""The worker's dynamic batcher on its own: who gets batched with whom, who gets which rows back, shedding,
failures. `run` is a numpy function that tags each row, so every answer can be traced to its request."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from tuneserve.service.engine.batcher import DynamicBatcher, Overloaded


class Engine:
    """Returns each image's first pixel as its 'logit' and records every call's size; optionally slow."""

    def __init__(self, delay: float = 0.0, fail_on: float | None = None):
        self.calls: list[int] = []
        self.delay = delay
        self.fail_on = fail_on
        self.running = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert self.running.acquire(blocking=False), "two model calls overlapped"
        try:
            self.calls.append(len(batch))
            time.sleep(self.delay)
            if self.fail_on is not None and (batch[:, 0, 0, 0] == self.fail_on).any():
                raise RuntimeError("engine failed")
            return batch[:, :1, 0, 0].copy()  # (n, 1)
        finally:
            self.running.release()


def images(*tags: float) -> np.ndarray:
    return np.stack([np.full((3, 2, 2), t, np.float32) for t in tags])


def test_concurrent_requests_share_calls_and_get_their_own_rows():
    engine = Engine(delay=0.02)

    async def main():
        b = DynamicBatcher(engine, max_batch=8)
        requests = [images(*range(10 * i, 10 * i + 1 + i % 3)) for i in range(20)]  # 1 to 3 images each
        answers = await asyncio.gather(*(b.submit(r) for r in requests))
        b.close()
        return requests, answers

    requests, answers = asyncio.run(main())
    for req, ans in zip(requests, answers):
        np.testing.assert_array_equal(ans[:, 0], req[:, 0, 0, 0])
    assert sum(engine.calls) == sum(len(r) for r in requests)
    assert max(engine.calls) <= 8 and len(engine.calls) < len(requests)  # batched, never past max_batch


def test_an_idle_engine_answers_a_lone_request_at_once():
    engine = Engine()

    async def main():
        b = DynamicBatcher(engine, max_batch=64)
        t0 = time.perf_counter()
        await b.submit(images(1))
        b.close()
        return time.perf_counter() - t0

    assert asyncio.run(main()) < 0.5 and engine.calls == [1]  # no waiting for company


def test_a_request_larger_than_max_batch_runs_alone_and_whole():
    engine = Engine()

    async def main():
        b = DynamicBatcher(engine, max_batch=4)
        out = await b.submit(images(*range(10)))
        b.close()
        return out

    np.testing.assert_array_equal(asyncio.run(main())[:, 0], np.arange(10))
    assert engine.calls == [10]


def test_requests_whose_deadline_passes_in_the_queue_are_shed_and_the_rest_served():
    engine = Engine(delay=0.1)

    async def main():
        b = DynamicBatcher(engine, max_batch=1)
        deadline = time.monotonic() + 0.05
        results = await asyncio.gather(*(b.submit(images(i), deadline) for i in range(4)), return_exceptions=True)
        after = await b.submit(images(9), time.monotonic() + 0.05)  # the queue drained: served again
        b.close()
        return results, after

    results, after = asyncio.run(main())
    assert isinstance(results[0], np.ndarray)  # ran at once
    shed = [r for r in results if isinstance(r, Overloaded)]
    assert len(shed) == 3 and "past the request's deadline" in str(shed[0])
    assert engine.calls == [1, 1]  # the shed images never ran
    assert after[0, 0] == 9


def test_an_engine_failure_reaches_every_request_in_that_call_only():
    engine = Engine(delay=0.02, fail_on=3.0)

    async def main():
        b = DynamicBatcher(engine, max_batch=8)
        first = asyncio.ensure_future(b.submit(images(0)))  # runs alone while the others queue
        await asyncio.sleep(0.005)
        batch = await asyncio.gather(*(b.submit(images(i)) for i in (1, 2, 3)), return_exceptions=True)
        later = await b.submit(images(4))
        b.close()
        return await first, batch, later

    first, batch, later = asyncio.run(main())
    assert first[0, 0] == 0 and later[0, 0] == 4
    assert all(isinstance(r, RuntimeError) for r in batch)  # 1, 2 and 3 shared the failing call


def test_a_caller_that_gave_up_is_skipped():
    engine = Engine(delay=0.05)

    async def main():
        b = DynamicBatcher(engine, max_batch=8)
        busy = asyncio.ensure_future(b.submit(images(0)))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(b.submit(images(1)))
        await asyncio.sleep(0)
        gone.cancel()
        kept = await b.submit(images(2))
        await busy
        b.close()
        return kept

    assert asyncio.run(main())[0, 0] == 2
    assert engine.calls == [1, 1]  # the cancelled request's image never ran


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        DynamicBatcher(Engine(), max_batch=0)


def test_requests_that_cannot_share_a_call_fail_alone_and_the_batcher_keeps_serving():
    engine = Engine(delay=0.02)

    async def main():
        b = DynamicBatcher(engine, max_batch=8)
        first = asyncio.ensure_future(b.submit(images(0)))
        await asyncio.sleep(0.005)
        odd = np.zeros((1, 3, 4, 4), np.float32)  # another shape: cannot be concatenated with the others
        mixed = await asyncio.gather(b.submit(images(1)), b.submit(odd), return_exceptions=True)
        later = await b.submit(images(2))
        b.close()
        return await first, mixed, later

    first, mixed, later = asyncio.run(main())
    assert first[0, 0] == 0 and later[0, 0] == 2
    assert all(isinstance(r, ValueError) for r in mixed)
