"""Dynamic batching inside the worker: concurrent requests' images meet in one model call.

Policy (as Triton's dynamic batcher without a queue delay): whenever the engine is free, it takes everything
queued, up to `max_batch` images, and runs it in a thread; requests that arrive meanwhile wait for the next
call. An idle engine therefore answers a lone request at once, and a busy one forms batches as large as the
load makes them, with no timer to tune. A request whose deadline (service/admission.py) passes before its
images start is shed (Overloaded -> 503) without running: its answer would come too late.

Why not BentoML's adaptive batcher: reaching it from the same service takes `self.to_async.<api>`, a second
trip through BentoML's ASGI stack and JSON per request, which cost more CPU than decoding the image did.
Measured side by side (2 CPU cores, EfficientNet-Lite0, 16 clients, runs interleaved): 116-122 img/s with
BentoML's batcher, 152-154 img/s with this one, p99 334 -> 227 ms (docs/benchmarks.md, "Serving: batching").
Here the arrays stay where they are and only an asyncio future is passed: each image is copied once, into the
batch the engine runs (a lone image not at all).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The request's deadline passed while its images waited for the engine."""


@dataclass
class _Pending:
    images: Sequence[np.ndarray]  # n images, each as the model takes it (e.g. uint8 (S, S, 3))
    future: asyncio.Future
    deadline: float  # time.monotonic() after which the images are not run
    explain: bool = False  # also wants the class activation maps of its images
    queued_at: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """`await batcher.submit(images, deadline)` -> logits float32 (n, classes); `run(batch)` is the model call.
    With `explain_run(batch)` -> (logits, cams float32 (N, classes, h, w)), `submit(..., explain=True)` gives
    (logits, cams): a batch holding any such request runs explain_run for all of it (one call, the same batch
    as classification; the others get their logits)."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int,
                 on_batch: Callable[[int, float], None] | None = None, on_wait: Callable[[float], None] | None = None,
                 executor: ThreadPoolExecutor | None = None,
                 explain_run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run = run
        self.explain_run = explain_run
        self.max_batch = max_batch
        self.on_batch = on_batch  # called with each call's image count and seconds (metrics)
        self.on_wait = on_wait  # called with each request's seconds in the queue (metrics)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        # One model call at a time: a second concurrent call would only compete for the same device. A
        # worker's batchers (one per model) share its one engine thread (engine.py, model_version.Shared).
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="tuneserve-infer")

    async def submit(self, images: Sequence[np.ndarray], deadline: float = float("inf"), explain: bool = False):
        """Logits (n, classes) for `images` (a list of n arrays, or one array of n along its first axis), with
        `explain` (logits, cams (n, classes, h, w)); Overloaded when `deadline` (time.monotonic) passes before
        they start."""
        if explain and self.explain_run is None:
            raise ValueError("this batcher's model has no class activation maps (explain_run is None)")
        self._ensure_started()
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(images, future, deadline, explain))
        self._wake.set()
        return await future

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _ensure_started(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._serve(), name="tuneserve-batcher")

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                taken = self._take()
                if not taken:
                    continue
                try:
                    batch = _batch([image for p in taken for image in p.images])
                    started = time.monotonic()
                    if any(p.explain for p in taken):
                        logits, cams = await loop.run_in_executor(self._executor, self.explain_run, batch)
                    else:
                        logits, cams = await loop.run_in_executor(self._executor, self.run, batch), None
                    seconds = time.monotonic() - started
                except Exception as e:  # noqa: BLE001 - every waiting request learns of the failure
                    for p in taken:
                        if not p.future.done():
                            p.future.set_exception(e)
                    continue
                if self.on_batch is not None:
                    self.on_batch(len(batch), seconds)
                start = 0
                for p in taken:
                    n = len(p.images)
                    if not p.future.done():  # the caller may have gone (client disconnect, timeout)
                        p.future.set_result((logits[start:start + n], cams[start:start + n]) if p.explain
                                            else logits[start:start + n])
                    start += n

    def _take(self) -> list[_Pending]:
        """Queued requests for the next call: whole requests, up to max_batch images (a request larger
        than max_batch goes alone). Requests whose deadline has passed are shed first."""
        now = time.monotonic()
        taken: list[_Pending] = []
        count = 0
        while self._queue:
            p = self._queue[0]
            if p.future.done():  # cancelled by its caller while queued
                self._queue.popleft()
                continue
            if now > p.deadline:
                self._queue.popleft()
                p.future.set_exception(Overloaded(f"waited {1000 * (now - p.queued_at):.0f} ms for the model, past "
                                                  "the request's deadline"))
                continue
            if taken and count + len(p.images) > self.max_batch:
                break
            self._queue.popleft()
            taken.append(p)
            count += len(p.images)
            if self.on_wait is not None:
                self.on_wait(now - p.queued_at)
        return taken


def _batch(images: list[np.ndarray]) -> np.ndarray:
    """The engine's batch (n, ...): one copy of each image; a lone image is a view (a contiguous array with an
    axis in front is still contiguous)."""
    return images[0][None] if len(images) == 1 else np.stack(images)
