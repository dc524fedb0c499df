"""One model version being served: its onnxruntime session and dynamic batcher, on the decoding pool and engine
thread that all of a worker's versions share (`Shared`, made by the engine and passed in).

No BentoML and no HTTP here. The path of an image: its decode cost read from the header and reserved from the
shared decode memory (decode_budget.py) -> decode + preprocess in the shared thread pool, concurrently with
other requests -> this version's DynamicBatcher, which gathers the arrays of concurrent requests into one
onnxruntime call whenever the engine thread is free -> softmax. Each step first checks the request's deadline,
so nothing is decoded or run for an answer that would come too late.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from tuneserve.models.preprocessing import (ImageDecodeError, Preprocessing, decode_estimate, full_scale_jpeg, normalise,
                                            preprocess_pixels)
from tuneserve.models.runtime import OnnxClassifier, bucket_sizes, softmax
from tuneserve.service.config import ServiceConfig
from tuneserve.service.engine.admission import Deadline
from tuneserve.service.engine.batcher import DynamicBatcher, Overloaded
from tuneserve.service.engine.decode_budget import LARGE_BYTES, DecodeBudget, DecodeBudgetExceeded, release_free_memory
from tuneserve.service.engine.errors import RequestError
from tuneserve.service.engine.metrics import Metrics
from tuneserve.service.gpu_decode import GpuJpegDecoder
from tuneserve.service.plan import ModelChoice, ServingPlan

log = logging.getLogger("tuneserve.service")


@dataclass(frozen=True)
class Shared:
    """What every model version of a worker shares, and why (docs/serving.md, "Several models"): one decoding
    pool and its memory budget, because decoding costs the same whichever model the image is for; one engine
    thread, so that two models' batches take turns on the device instead of fighting for its cores."""

    plan: ServingPlan
    pool: ThreadPoolExecutor  # decode + preprocess
    engine: ThreadPoolExecutor  # one thread: the model calls
    decode_budget: DecodeBudget
    gpu_decoder: GpuJpegDecoder | None  # ordinary JPEGs decode on the GPU where it loaded; None: the CPU
    decoder_status: str  # what decodes JPEGs, and why (GET /model: runtime.jpeg_decoder)
    metrics: Metrics

    @property
    def config(self) -> ServiceConfig:
        return self.plan.config


def decode_error_status(err: ImageDecodeError) -> int:
    """The status for a failure of `models.preprocessing.load_image`, from its (documented) reasons."""
    msg = str(err)
    if "over the limit" in msg or "decompression bomb" in msg:
        return 413  # too many pixels: refused before decoding
    if msg.startswith("unsupported image format"):
        return 415  # a real image, in a format we do not serve (ICO, PSD, ...)
    return 400  # empty, not an image, truncated or corrupt


class ModelVersion:
    """Loads and warms up `choice` (in the calling thread: it takes a while), then serves it on `shared`."""

    def __init__(self, choice: ModelChoice, shared: Shared):
        started = time.perf_counter()
        plan, metrics = shared.plan, shared.metrics
        self.choice = choice
        self.model = choice.stored
        self.shared = shared
        self.precision = choice.precision
        # Buckets up to the largest call the batcher makes: a full batch, or one /classify_batch request alone.
        # spin=False on CPU: onnxruntime's idle threads must not busy-wait on the cores decoding needs.
        self.session = OnnxClassifier(choice.onnx_path, device=plan.device, intra_op_threads=plan.ort_threads,
                                      max_batch=max(plan.max_batch_size, plan.config.max_batch_images),
                                      spin=plan.device == "cuda")
        name, version = self.model.name, self.model.version
        self._batcher = DynamicBatcher(
            self.session, plan.max_batch_size, executor=shared.engine,
            on_batch=lambda n, seconds: metrics.batch(name, version, n, seconds),
            on_wait=lambda seconds: metrics.engine_wait(name, version, seconds),
            explain_run=self._explain if self.model.explain_path is not None else None)
        self._explainer: OnnxClassifier | None = None  # the explain graph, loaded by the first explain batch
        self._active = 0  # requests using this version now: an old version is closed when they are done
        self._idle: asyncio.Event | None = None
        self._warm_up()
        log.info("loaded %s (%s, %d classes, %s) with onnxruntime on %s in %.1f s", self.tag, self.model.card.arch,
                 len(self.labels), self.precision, self.session.providers[0], time.perf_counter() - started)

    @property
    def tag(self) -> str:
        return self.model.tag

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> str:
        return self.model.version

    @property
    def input_size(self) -> int:
        """S of the S x S images the model takes."""
        return self.model.card.preprocessing.input_size

    @property
    def takes_pixels(self) -> bool:
        """True: the model takes uint8 (S, S, 3) pixels and normalises them itself; False (models exported
        before that): float32 (3, S, S), normalised on the host."""
        return self.session.takes_pixels

    @property
    def labels(self) -> list[str]:
        return self.model.card.labels

    def _warm_up(self) -> None:
        """Run the model before it serves: the first calls pay for memory arenas and, on CUDA, for cuDNN's
        per-shape algorithm search. With buckets (CUDA) these are every shape the session will run; without,
        powers of two up to the largest batch cover the common ones."""
        size = self.model.card.preprocessing.input_size
        for n in self.session.buckets or bucket_sizes(self.shared.plan.max_batch_size):
            self.session(np.zeros(self.session.input_shape(n, size), dtype=self.session.input_dtype))

    @contextlib.contextmanager
    def in_use(self) -> Iterator["ModelVersion"]:
        """Mark a request as using this version, so that a switch to another one waits for it (drained())."""
        self._active += 1
        try:
            yield self
        finally:
            self._active -= 1
            if self._active == 0 and self._idle is not None:
                self._idle.set()

    async def drained(self) -> None:
        """Return when no request uses this version any more (event loop only)."""
        if self._active:
            self._idle = asyncio.Event()
            await self._idle.wait()

    def close(self) -> None:
        self._batcher.close()

    # -- the work ----------------------------------------------------------------------------------------------

    async def preprocess(self, data: bytes, deadline: Deadline) -> np.ndarray:
        """Decode and preprocess one image in the worker's thread pool -> the model's input for it (uint8
        (S, S, 3), or float32 (3, S, S) for models that take it normalised), within the worker's decode memory
        budget and before `deadline`; a bad image raises RequestError (4xx), a late one 503."""
        pp, cfg, shared = self.model.card.preprocessing, self.shared.config, self.shared
        nbytes = decode_estimate(data, pp)
        max_bytes = cfg.max_decode_mb * 2**20
        if nbytes > max_bytes:  # known from the header: refused before it takes any memory or time
            raise RequestError(413, f"the image needs about {nbytes // 2**20} MiB to decode, over the limit of "
                                 f"{cfg.max_decode_mb} MiB (server setting TUNESERVE_MAX_DECODE_MB)")
        loop, normalised = asyncio.get_running_loop(), not self.takes_pixels
        try:
            async with shared.decode_budget.reserve(nbytes, deadline.remaining()):
                if shared.gpu_decoder is not None and full_scale_jpeg(data, pp, cfg.max_pixels):
                    # uint8 (S, S, 3): decoded, resized and cropped on the GPU (or cropped in the pool)
                    pixels = await shared.gpu_decoder.preprocess(data, pp, shared.pool)
                    if pixels is not None:  # else the CPU decodes it, and explains any error
                        if deadline.expired():
                            raise _Late()
                        return normalise(pixels, pp) if normalised else pixels
                return await loop.run_in_executor(
                    shared.pool, _decode_in_time, data, pp, cfg.max_pixels, max_bytes, nbytes, deadline, normalised)
        except ImageDecodeError as e:
            raise RequestError(decode_error_status(e), str(e)) from None
        except (DecodeBudgetExceeded, _Late):
            raise deadline.late("waiting to decode the image") from None

    @property
    def can_explain(self) -> bool:
        """The model has a graph with the class activation map output (models exported before it do not)."""
        return self.model.explain_path is not None

    @property
    def cam_grid(self) -> list[int] | None:
        """[h, w] of the class activation maps (the export's parity report measured them), or None."""
        shape = self.model.card.parity.get("cam_shape") if self.can_explain else None
        return list(shape[1:]) if shape else None

    def _explain(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """On the engine thread: (logits, cams) for a batch holding an explain request, from the fp32 explain graph
        (model.explain.onnx), loaded and warmed the first time (~0.5 s for Lite0 on CPU): a version that is never
        asked to explain never holds it in memory."""
        if self._explainer is None:
            plan = self.shared.plan
            self._explainer = OnnxClassifier(self.model.explain_path, device=plan.device,
                                             intra_op_threads=plan.ort_threads, spin=plan.device == "cuda",
                                             max_batch=max(plan.max_batch_size, plan.config.max_batch_images))
            log.info("loaded the explain graph of %s", self.tag)
        return self._explainer.explain(batch)

    async def classify(self, arrays: list[np.ndarray], deadline: Deadline, explain: bool = False):
        """Probabilities float32 (N, classes) for images as `preprocess` makes them, run together with whatever
        other requests are waiting for this version, unless `deadline` passes first (503). With `explain`:
        (probabilities, cams float32 (N, classes, h, w)), each class's logit at every location."""
        try:
            out = await self._batcher.submit(arrays, deadline.expires, explain=explain)
        except Overloaded:
            raise deadline.late("waiting for the model") from None
        return (softmax(out[0]), out[1]) if explain else softmax(out)

    def describe(self) -> dict[str, Any]:
        card, plan, cfg = self.model.card, self.shared.plan, self.shared.config
        return {
            "name": self.name,
            "version": self.version,
            "tag": self.tag,
            "arch": card.arch,
            "num_classes": card.num_classes,
            "labels": card.labels,
            "input_size": card.preprocessing.input_size,
            "input": "uint8 pixels (N, S, S, 3)" if self.takes_pixels else "float32 normalised (N, 3, S, S)",
            "explain": self.can_explain,
            "preprocessing": card.preprocessing.to_dict(),
            "metrics": card.metrics,
            "parity": card.parity,
            "created": self.model.creation_time,
            "runtime": {"provider": self.session.providers[0], "device": self.session.device,
                        "precision": self.precision, "variants": card.variants,
                        "batch_buckets": self.session.buckets, "io_binding": self.session.io_binding,
                        "jpeg_decoder": self.shared.decoder_status, "device_reason": plan.device_reason,
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
                    deadline: Deadline, normalised: bool) -> np.ndarray:
    """In a pool thread: uint8 (S, S, 3) pixels of `data` (float32 (3, S, S) when `normalised`) unless its
    deadline has passed while it waited for the thread."""
    if deadline.expired():
        raise _Late()
    try:
        pixels = preprocess_pixels(data, pp, max_pixels, max_bytes)
        return normalise(pixels, pp) if normalised else pixels
    finally:
        if nbytes > LARGE_BYTES:
            release_free_memory()  # a large decode's buffers: back to the system now, not at the next peak
