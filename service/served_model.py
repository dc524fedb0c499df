"""One model being served: its onnxruntime session, dynamic batcher, admission control and decoding pool.

No BentoML here: the BentoML service (service/service.py) makes one ServedModel in each worker process and
the routes (service/routes.py) call it; tests build one from a ServingPlan and drive it directly or
through the routes. The path of an image: decode + preprocess in the thread pool, concurrently with other
requests -> the DynamicBatcher, which gathers the arrays of concurrent requests into one onnxruntime call
whenever the engine is free -> softmax.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np

from tuneserve.models.artifact import FP16_ONNX_FILE
from tuneserve.models.precision import choose_precision
from tuneserve.models.preprocessing import ImageDecodeError, preprocess
from tuneserve.models.runtime import OnnxClassifier, bucket_sizes, softmax
from tuneserve.service.admission import DelayGate
from tuneserve.service.batcher import DynamicBatcher, Overloaded
from tuneserve.service.config import ServiceConfig
from tuneserve.service.inputs import HTTPError, decode_error_status
from tuneserve.service.plan import ServingPlan

log = logging.getLogger("tuneserve.service")


class ServedModel:
    """Loads, warms up and serves `plan.model`; `on_batch(n)` is called with each inference call's image count."""

    def __init__(self, plan: ServingPlan, on_batch: Callable[[int], None] | None = None):
        started = time.perf_counter()
        self.plan = plan
        self.model = plan.model
        card = self.model.card
        self.precision = choose_precision(plan.config.precision, plan.device, card.variants)
        onnx_path = self.model.path / FP16_ONNX_FILE if self.precision == "fp16" else self.model.onnx_path
        # Buckets up to the largest call the batcher makes: a full batch, or one /classify_batch request alone.
        # spin=False on CPU: onnxruntime's idle threads must not busy-wait on the cores decoding needs.
        self.session = OnnxClassifier(onnx_path, device=plan.config.device, intra_op_threads=plan.ort_threads,
                                      max_batch=max(plan.max_batch_size, plan.config.max_batch_images),
                                      spin=plan.device == "cuda")
        self._batcher = DynamicBatcher(self.session, plan.max_batch_size, plan.max_latency_ms, on_batch=on_batch)
        self._in_flight = 0  # images admitted and not answered yet (event-loop only: no lock)
        self._gate = DelayGate(plan.max_latency_ms / 1000)
        self._pool = ThreadPoolExecutor(plan.preprocess_threads, thread_name_prefix="tuneserve-preprocess")
        self._warm_up()
        log.info(
            "serving %s (%s, %d classes, %s) with onnxruntime on %s (%s intra-op threads); batching %s; "
            "%d preprocessing threads; ready in %.1f s", self.tag, card.arch, len(self.labels), self.precision,
            self.session.providers[0], plan.ort_threads or "default",
            f"max_batch_size={plan.max_batch_size} max_latency_ms={plan.max_latency_ms}" if plan.batching else "off",
            plan.preprocess_threads, time.perf_counter() - started,
        )

    @property
    def tag(self) -> str:
        return self.model.tag

    @property
    def labels(self) -> list[str]:
        return self.model.card.labels

    @property
    def config(self) -> ServiceConfig:
        return self.plan.config

    def _warm_up(self) -> None:
        """Run the model before reporting ready: the first calls pay for memory arenas and, on CUDA, for
        cuDNN's per-shape algorithm search. With buckets (CUDA) these are every shape the session will run;
        without, powers of two up to the largest batch cover the common ones."""
        size = self.model.card.preprocessing.input_size
        for n in self.session.buckets or bucket_sizes(self.plan.max_batch_size):
            self.session(np.zeros((n, 3, size, size), dtype=np.float32))

    def close(self) -> None:
        self._batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- admission: refuse early and cheaply rather than queue without bound -----------------------------------

    def check_capacity(self) -> None:
        """503 now, before a request's body is read, when a new request would be refused anyway."""
        if self._in_flight >= self.config.max_in_flight:
            raise self._busy()
        if self._standing_queue():
            raise self._slow()

    @contextlib.contextmanager
    def admit(self, images: int) -> Iterator[None]:
        """Count `images` as in flight while the block runs; refuse (503) beyond TUNESERVE_MAX_IN_FLIGHT, or
        while recent requests all took longer than TUNESERVE_MAX_LATENCY_MS (service/admission.py), so a
        flood gets fast answers instead of an ever-growing queue."""
        if self._in_flight + images > self.config.max_in_flight:
            raise self._busy()
        if self._standing_queue():
            raise self._slow()
        self._in_flight += images
        admitted_at = self._gate.clock()
        try:
            yield
        finally:
            self._in_flight -= images
            self._gate.record(admitted_at)

    def _busy(self) -> HTTPError:
        return HTTPError(
            503, f"server overloaded: {self._in_flight} images are already being processed by this worker "
            f"(limit TUNESERVE_MAX_IN_FLIGHT={self.config.max_in_flight}); retry shortly",
            {"Retry-After": "1"},
        )

    def _standing_queue(self) -> bool:
        """Recent requests all took too long *and* more than a batch of images is waiting now: a lone slow
        request (a huge image) on an idle server does not turn the next one away."""
        return self._in_flight >= self.plan.max_batch_size and not self._gate.open()

    def _slow(self) -> HTTPError:
        delay = self._gate.min_recent_delay() or 0.0
        return HTTPError(
            503, f"server overloaded: every request finished in the last second took over {1000 * delay:.0f} ms "
            f"(bound TUNESERVE_MAX_LATENCY_MS={self.plan.max_latency_ms}); retry shortly", {"Retry-After": "1"},
        )

    # -- the work ----------------------------------------------------------------------------------------------

    async def preprocess(self, data: bytes) -> np.ndarray:
        """Decode and preprocess one image in the thread pool -> float32 (3, S, S); a bad image raises
        HTTPError (4xx)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._pool, preprocess, data, self.model.card.preprocessing, self.config.max_pixels
            )
        except ImageDecodeError as e:
            raise HTTPError(decode_error_status(e), str(e)) from None

    async def classify(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Probabilities float32 (N, classes) for preprocessed float32 (3, S, S) images, run together with
        whatever other requests are waiting for the engine."""
        try:
            logits = await self._batcher.submit(np.stack(arrays))
        except Overloaded as e:
            raise HTTPError(503, f"server overloaded: {e} (TUNESERVE_MAX_LATENCY_MS={self.plan.max_latency_ms}); "
                                 "retry shortly", {"Retry-After": "1"}) from None
        return softmax(logits)

    def describe(self) -> dict[str, Any]:
        card, plan, cfg = self.model.card, self.plan, self.config
        return {
            "tag": self.tag,
            "arch": card.arch,
            "num_classes": card.num_classes,
            "labels": card.labels,
            "input_size": card.preprocessing.input_size,
            "preprocessing": card.preprocessing.to_dict(),
            "metrics": card.metrics,
            "parity": card.parity,
            "created": self.model.creation_time,
            "runtime": {"provider": self.session.providers[0], "device": self.session.device,
                        "precision": self.precision, "variants": card.variants,
                        "batch_buckets": self.session.buckets, "io_binding": self.session.io_binding,
                        "intra_op_threads": plan.ort_threads, "preprocess_threads": plan.preprocess_threads},
            "batching": {"enabled": plan.batching, "max_batch_size": plan.max_batch_size,
                         "max_latency_ms": plan.max_latency_ms},
            "limits": {
                "max_image_bytes": cfg.max_image_bytes,
                "max_pixels": cfg.max_pixels,
                "max_batch_images": cfg.max_batch_images,
                "max_request_bytes": cfg.max_request_bytes,
                "default_top_k": cfg.top_k,
            },
        }
