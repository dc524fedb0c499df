"""A worker process's shared machinery, and the repository of models it serves.

One per BentoML worker (service/service.py), or built directly by tests and benchmarks. What its models
share, and why (docs/serving.md, "Several models"): one admission estimate and one latency bound, because
they share the CPU; one decoding pool and its memory budget, because decoding costs the same whichever model
the image is for; one engine thread, so that two models' batches take turns on the device instead of
fighting for its cores. Each model keeps its own onnxruntime session and batcher (service/served_model.py).
"""
from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from tuneserve.service.admission import QUEUE_SHARE_OF_BOUND, Deadline, WorkEstimate, lower_thread_priority
from tuneserve.service.config import ServiceConfig
from tuneserve.service.decode_budget import DecodeBudget
from tuneserve.service.gpu_decode import GpuJpegDecoder
from tuneserve.service.inputs import HTTPError
from tuneserve.service.metrics import Metrics
from tuneserve.service.plan import ServingPlan
from tuneserve.service.repository import ModelRepository
from tuneserve.service.served_model import ServedModel


class Worker:
    """Loads the plan's models (in the calling thread: it takes a while) and serves them."""

    def __init__(self, plan: ServingPlan, metrics: Metrics | None = None):
        self.plan = plan
        self.metrics = metrics or Metrics()
        # Images in flight and how fast they finish; under more load than the rate was measured at, a worker
        # can go faster by as many decoding threads as it has, at most (service/admission.py).
        self.work = WorkEstimate(parallelism=plan.preprocess_threads)
        self.pool = ThreadPoolExecutor(plan.preprocess_threads, thread_name_prefix="tuneserve-preprocess",
                                       initializer=lower_thread_priority)
        self.decode_budget = DecodeBudget(plan.config.decode_memory_mb * 2**20, plan.preprocess_threads)
        self.engine = ThreadPoolExecutor(1, thread_name_prefix="tuneserve-infer")
        # Ordinary JPEGs decode on the GPU where nvImageCodec can (service/gpu_decode.py); None: on the CPU.
        self.gpu_decoder = (GpuJpegDecoder.load() if plan.device == "cuda" and plan.config.gpu_decode == "auto"
                            else None)
        self.models = ModelRepository(self)

    @property
    def config(self) -> ServiceConfig:
        return self.plan.config

    def load(self, choice) -> ServedModel:
        """A ServedModel for `choice` on this worker (blocking: load and warm-up)."""
        return ServedModel(choice, self, self.metrics)

    def get(self, name: str | None) -> ServedModel:
        """The version of model `name` (None: the default model) served now; HTTPError 404 naming the served
        ones when there is none."""
        return self.models.get(name)

    async def start(self) -> None:
        """Background work on the event loop: poll mode's look at the store, explicit mode's sync between
        workers (service/repository.py)."""
        await self.models.start()

    def close(self) -> None:
        self.models.close()
        if self.gpu_decoder is not None:
            self.gpu_decoder.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown(wait=False, cancel_futures=True)

    # -- admission: refuse early and cheaply rather than queue without bound -----------------------------------

    def deadline(self) -> Deadline:
        """For a request arriving now: answer within TUNESERVE_MAX_LATENCY_MS, or not at all."""
        now = time.monotonic()
        return Deadline(now, now + self.plan.max_latency_ms / 1000)

    def check_capacity(self) -> None:
        """503 now, before a request's body is read, when one more image would be refused anyway."""
        self._refuse_if_full(1)

    def refusal(self) -> bytes | None:
        """check_capacity as the JSON body of its 503, or None: for refusing a request from its headers alone
        (service/http_protocol.py)."""
        try:
            self._refuse_if_full(1)
        except HTTPError as e:
            return json.dumps({"error": e.message}).encode()
        return None

    @contextlib.contextmanager
    def admit(self, images: int, estimate: bool = True) -> Iterator[None]:
        """Count `images` as in flight while the block runs; refuse (503) beyond TUNESERVE_MAX_IN_FLIGHT, or
        (`estimate`) when the work already in flight would keep them waiting past the queue's share of the
        latency bound (service/admission.py), so a flood gets fast answers instead of an ever-growing queue.
        `estimate=False` for a request admission already judged from its headers: refusing it now, after its
        body was read, would cost more than serving it."""
        self._refuse_if_full(images, estimate)
        self.work.started(images)
        served = False
        try:
            yield
            served = True
        finally:
            self.work.finished(images, served)

    def _refuse_if_full(self, images: int, estimate: bool = True) -> None:
        in_flight, cfg = self.work.in_flight, self.config
        if in_flight + images > cfg.max_in_flight:
            raise HTTPError(503, f"server overloaded: {in_flight} images are already being processed by this "
                                 f"worker (limit TUNESERVE_MAX_IN_FLIGHT={cfg.max_in_flight}); retry shortly",
                            {"Retry-After": "1"})
        if not estimate:
            return
        wait = self.work.wait_s(images)
        if wait > QUEUE_SHARE_OF_BOUND * self.plan.max_latency_ms / 1000:
            raise HTTPError(503, f"server overloaded: the {in_flight} images in flight (this worker finishes "
                                 f"~{self.work.rate()[0]:.0f}/s) would keep this request waiting "
                                 f"~{1000 * wait:.0f} ms, too close to the latency bound "
                                 f"(TUNESERVE_MAX_LATENCY_MS={self.plan.max_latency_ms}); retry shortly",
                            {"Retry-After": "1"})

    def late(self, deadline: Deadline, stage: str) -> HTTPError:
        return HTTPError(503, f"server overloaded: {deadline.waited_ms():.0f} ms passed {stage}, over the latency "
                              f"bound (TUNESERVE_MAX_LATENCY_MS={self.plan.max_latency_ms}); retry shortly",
                         {"Retry-After": "1"})
