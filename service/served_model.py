"""One model being served: its onnxruntime session, dynamic batcher, admission control and decoding pool.

No BentoML here: the BentoML service (service/service.py) makes one ServedModel in each worker process and
the routes (service/routes.py) call it; tests build one from a ServingPlan and drive it directly or
through the routes. The path of a request: admission (service/admission.py: refused at once when the work
in flight would keep it past its deadline) -> per image, its decode cost read from the header and reserved
from the worker's decode memory (service/decode_budget.py) -> decode + preprocess in the thread pool,
concurrently with other requests -> the DynamicBatcher, which gathers the arrays of concurrent requests
into one onnxruntime call whenever the engine is free -> softmax. Each step first checks the request's
deadline, so nothing is decoded or run for an answer that would come too late.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np

from tuneserve.models.preprocessing import ImageDecodeError, Preprocessing, decode_estimate, preprocess
from tuneserve.models.runtime import OnnxClassifier, bucket_sizes, softmax
from tuneserve.service.admission import QUEUE_SHARE_OF_BOUND, Deadline, WorkEstimate, lower_thread_priority
from tuneserve.service.batcher import DynamicBatcher, Overloaded
from tuneserve.service.decode_budget import LARGE_BYTES, DecodeBudget, DecodeBudgetExceeded, release_free_memory
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
        self.precision = plan.precision
        # Buckets up to the largest call the batcher makes: a full batch, or one /classify_batch request alone.
        # spin=False on CPU: onnxruntime's idle threads must not busy-wait on the cores decoding needs.
        self.session = OnnxClassifier(plan.onnx_path, device=plan.config.device, intra_op_threads=plan.ort_threads,
                                      max_batch=max(plan.max_batch_size, plan.config.max_batch_images),
                                      spin=plan.device == "cuda")
        self._batcher = DynamicBatcher(self.session, plan.max_batch_size, on_batch=on_batch)
        # Images in flight and how fast they finish; under more load than the rate was measured at, a worker
        # can go faster by as many decoding threads as it has, at most (service/admission.py).
        self._work = WorkEstimate(parallelism=plan.preprocess_threads)
        self._pool = ThreadPoolExecutor(plan.preprocess_threads, thread_name_prefix="tuneserve-preprocess",
                                        initializer=lower_thread_priority)
        self._decode_budget = DecodeBudget(plan.config.decode_memory_mb * 2**20, plan.preprocess_threads)
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
        self._work.started(images)
        served = False
        try:
            yield
            served = True
        finally:
            self._work.finished(images, served)

    def _refuse_if_full(self, images: int, estimate: bool = True) -> None:
        in_flight, cfg = self._work.in_flight, self.config
        if in_flight + images > cfg.max_in_flight:
            raise HTTPError(503, f"server overloaded: {in_flight} images are already being processed by this "
                                 f"worker (limit TUNESERVE_MAX_IN_FLIGHT={cfg.max_in_flight}); retry shortly",
                            {"Retry-After": "1"})
        if not estimate:
            return
        wait = self._work.wait_s(images)
        if wait > QUEUE_SHARE_OF_BOUND * self.plan.max_latency_ms / 1000:
            raise HTTPError(503, f"server overloaded: the {in_flight} images in flight (this worker finishes "
                                 f"~{self._work.rate()[0]:.0f}/s) would keep this request waiting "
                                 f"~{1000 * wait:.0f} ms, too close to the latency bound "
                                 f"(TUNESERVE_MAX_LATENCY_MS={self.plan.max_latency_ms}); retry shortly",
                            {"Retry-After": "1"})

    def late(self, deadline: Deadline, stage: str) -> HTTPError:
        return HTTPError(503, f"server overloaded: {deadline.waited_ms():.0f} ms passed {stage}, over the latency "
                              f"bound (TUNESERVE_MAX_LATENCY_MS={self.plan.max_latency_ms}); retry shortly",
                         {"Retry-After": "1"})

    # -- the work ----------------------------------------------------------------------------------------------

    async def preprocess(self, data: bytes, deadline: Deadline) -> np.ndarray:
        """Decode and preprocess one image in the thread pool -> float32 (3, S, S), within the worker's decode
        memory budget and before `deadline`; a bad image raises HTTPError (4xx), a late one 503."""
        pp, cfg = self.model.card.preprocessing, self.config
        nbytes = decode_estimate(data, pp)
        max_bytes = cfg.max_decode_mb * 2**20
        if nbytes > max_bytes:  # known from the header: refused before it takes any memory or time
            raise HTTPError(413, f"the image needs about {nbytes // 2**20} MiB to decode, over the limit of "
                                 f"{cfg.max_decode_mb} MiB (server setting TUNESERVE_MAX_DECODE_MB)")
        try:
            async with self._decode_budget.reserve(nbytes, deadline.remaining()):
                return await asyncio.get_running_loop().run_in_executor(
                    self._pool, _decode_in_time, data, pp, cfg.max_pixels, max_bytes, nbytes, deadline)
        except ImageDecodeError as e:
            raise HTTPError(decode_error_status(e), str(e)) from None
        except (DecodeBudgetExceeded, _Late):
            raise self.late(deadline, "waiting to decode the image") from None

    async def classify(self, arrays: list[np.ndarray], deadline: Deadline) -> np.ndarray:
        """Probabilities float32 (N, classes) for preprocessed float32 (3, S, S) images, run together with
        whatever other requests are waiting for the engine, unless `deadline` passes first (503)."""
        try:
            logits = await self._batcher.submit(np.stack(arrays), deadline.expires)
        except Overloaded:
            raise self.late(deadline, "waiting for the model") from None
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
                "max_decode_mb": cfg.max_decode_mb,
                "decode_memory_mb": cfg.decode_memory_mb,
                "max_latency_ms": plan.max_latency_ms,
                "max_batch_images": cfg.max_batch_images,
                "max_request_bytes": cfg.max_request_bytes,
                "default_top_k": cfg.top_k,
            },
        }


class _Late(Exception):
    """The deadline passed while the image waited for a decoding thread."""


def _decode_in_time(data: bytes, pp: Preprocessing, max_pixels: int, max_bytes: int, nbytes: int,
                    deadline: Deadline) -> np.ndarray:
    """In a pool thread: preprocess `data` unless its deadline has passed while it waited for the thread."""
    if deadline.expired():
        raise _Late()
    try:
        return preprocess(data, pp, max_pixels, max_bytes)
    finally:
        if nbytes > LARGE_BYTES:
            release_free_memory()  # a large decode's buffers: back to the system now, not at the next peak
