"""The BentoML service: one registered ONNX classifier behind POST /classify, POST /classify_batch, GET /model.

    bentoml serve service.service:Classifier          # or: tuneserve serve [--model TAG]

A request's path (HTTP parsing and limits live in service/routes.py, an ASGI app mounted into this service):
read and check the body on the event loop -> decode + preprocess in a thread pool, concurrently with other
requests -> the worker's DynamicBatcher (service/batcher.py), which gathers the arrays of concurrent requests
into ONE onnxruntime call whenever the engine is free -> softmax, top-k -> JSON.

Batching happens in this process, not through a batchable BentoML API: calling one from the same service
(`self.to_async.<api>`) is a second trip through BentoML's ASGI stack and JSON per request, which cost 25%
of the throughput on the 2-core sandbox (docs/benchmarks.md). The arrays never leave the process.

No torch here: the serving image has onnxruntime, numpy and Pillow only. The model is chosen once, at
import, from TUNESERVE_MODEL (see service/config.py), and declared as a BentoModel so `bentoml build` packs it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import bentoml
import numpy as np

from models.preprocessing import ImageDecodeError, preprocess
from models.artifact import FP16_ONNX_FILE
from models.precision import choose_precision
from models.runtime import OnnxClassifier, bucket_sizes, gpu_present, softmax
from models.architectures import BUILTIN_NAME
from models.store import StoredModel, load_model
from service.admission import DelayGate
from service.batch_metrics import BATCH_SIZE_BUCKETS, BATCH_SIZE_METRIC
from service.batcher import DynamicBatcher, Overloaded
from service.config import ServiceConfig
from service.inputs import HTTPError, decode_error_status
from service.routes import app as http_app

log = logging.getLogger("tuneserve.service")
# bentoml's server logging config leaves the root logger at WARNING; the start-up lines below must show.
log.setLevel(logging.INFO)

def resolve_model(cfg: ServiceConfig) -> StoredModel:
    """The chosen model, or the built-in one, exported and registered on first use (needs torch, once)."""
    if cfg.model:
        return load_model(cfg.model)  # ModelNotFoundError names the tag and lists the known models
    try:
        return load_model(BUILTIN_NAME)
    except LookupError:
        from training.builtin import ensure_builtin_model  # lazy: torch is needed only for this export

        log.info("no model chosen and %s is not registered yet: exporting it (once, ~15 s)", BUILTIN_NAME)
        return ensure_builtin_model()


def expected_device(device: str) -> str:
    """Where OnnxClassifier will run, known before it exists: the batching limits depend on it."""
    import onnxruntime as ort

    if device == "cpu":
        return "cpu"
    usable = "CUDAExecutionProvider" in ort.get_available_providers()
    return "cuda" if device == "cuda" or (usable and gpu_present()) else "cpu"


CONFIG = ServiceConfig.from_env()
MODEL = resolve_model(CONFIG)
DEVICE = expected_device(CONFIG.device)
MAX_BATCH_SIZE, MAX_LATENCY_MS = CONFIG.batching(DEVICE)
WORKERS = CONFIG.worker_count(DEVICE)
THREADS = CONFIG.threads(WORKERS)  # decode/preprocess threads in each worker
BATCHING = MAX_BATCH_SIZE > 1  # 1: every request's images run alone (the baseline the benchmark compares with)
# Images per inference call, as Prometheus sees them (GET /metrics): how well batching works under the load.
BATCH_SIZES = bentoml.metrics.Histogram(
    name=BATCH_SIZE_METRIC, documentation="images per onnxruntime call", buckets=BATCH_SIZE_BUCKETS,
)


@bentoml.service(
    name="tuneserve",
    workers=WORKERS,
    traffic={"timeout": CONFIG.timeout_s},
    # Recorded in the Bento (and its Dockerfile) so that a built image serves exactly the packed version.
    envs=[{"name": "TUNESERVE_MODEL", "value": MODEL.tag}],
)
@bentoml.asgi_app(http_app, path="/")
class Classifier:
    """Image classification with a fine-tuned CNN exported to ONNX: POST /classify (one image, raw body
    or multipart field `image`), POST /classify_batch (multipart, one file part per image), GET /model."""

    model_ref = bentoml.models.BentoModel(MODEL.tag)

    def __init__(self) -> None:
        started = time.perf_counter()
        self.config = CONFIG
        self.model = load_model(MODEL.tag)
        self.precision = choose_precision(CONFIG.precision, DEVICE, self.model.card.variants)
        onnx_path = self.model.path / FP16_ONNX_FILE if self.precision == "fp16" else self.model.onnx_path
        # Buckets up to the largest call the batcher makes: a full batch, or one /classify_batch request alone.
        # spin=False on CPU: onnxruntime's idle threads must not busy-wait on the cores decoding needs.
        self.session = OnnxClassifier(onnx_path, device=CONFIG.device, intra_op_threads=CONFIG.onnxruntime_threads(DEVICE),
                                      max_batch=max(MAX_BATCH_SIZE, CONFIG.max_batch_images), spin=DEVICE == "cuda")
        self.labels = self.model.card.labels
        self._batcher = DynamicBatcher(self.session, MAX_BATCH_SIZE, MAX_LATENCY_MS, on_batch=BATCH_SIZES.observe)
        self._in_flight = 0  # images admitted and not answered yet (event-loop only: no lock)
        self._gate = DelayGate(MAX_LATENCY_MS / 1000)
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="tuneserve-preprocess")
        self._ready = False
        self._warm_up()
        self._ready = True
        log.info(
            "serving %s (%s, %d classes, %s) with onnxruntime on %s (%s intra-op threads); batching %s; "
            "%d preprocessing threads; ready in %.1f s", self.model.tag, self.model.card.arch, len(self.labels),
            self.precision, self.session.providers[0], CONFIG.onnxruntime_threads(DEVICE) or "default",
            f"max_batch_size={MAX_BATCH_SIZE} max_latency_ms={MAX_LATENCY_MS}" if BATCHING else "off",
            THREADS, time.perf_counter() - started,
        )

    def _warm_up(self) -> None:
        """Run the model before reporting ready: the first calls pay for memory arenas and, on CUDA, for
        cuDNN's per-shape algorithm search. With buckets (CUDA) these are every shape the session will run;
        without, powers of two up to the largest batch cover the common ones."""
        size = self.model.card.preprocessing.input_size
        for n in self.session.buckets or bucket_sizes(MAX_BATCH_SIZE):
            self.session(np.zeros((n, 3, size, size), dtype=np.float32))

    def __is_ready__(self) -> bool:
        return self._ready

    @bentoml.on_shutdown
    def _stop_pools(self) -> None:
        self._batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- used by service/routes.py --------------------------------------------------------------------

    def check_capacity(self) -> None:
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
        return self._in_flight >= MAX_BATCH_SIZE and not self._gate.open()

    def _slow(self) -> HTTPError:
        delay = self._gate.min_recent_delay() or 0.0
        return HTTPError(
            503, f"server overloaded: every request finished in the last second took over {1000 * delay:.0f} ms "
            f"(bound TUNESERVE_MAX_LATENCY_MS={MAX_LATENCY_MS}); retry shortly", {"Retry-After": "1"},
        )

    async def preprocess(self, data: bytes) -> np.ndarray:
        """Decode and preprocess one image in the thread pool; a bad image raises HTTPError (4xx)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._pool, preprocess, data, self.model.card.preprocessing, self.config.max_pixels
            )
        except ImageDecodeError as e:
            raise HTTPError(decode_error_status(e), str(e)) from None

    async def classify(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Probabilities (N, classes) for preprocessed float32 (3, S, S) images, run together with whatever
        other requests are waiting for the engine."""
        try:
            logits = await self._batcher.submit(np.stack(arrays))
        except Overloaded as e:
            raise HTTPError(503, f"server overloaded: {e} (TUNESERVE_MAX_LATENCY_MS={MAX_LATENCY_MS}); retry shortly",
                            {"Retry-After": "1"}) from None
        return softmax(logits)

    def describe(self) -> dict[str, Any]:
        card = self.model.card
        return {
            "tag": self.model.tag,
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
                        "intra_op_threads": CONFIG.onnxruntime_threads(DEVICE),
                        "preprocess_threads": THREADS},
            "batching": {"enabled": BATCHING, "max_batch_size": MAX_BATCH_SIZE, "max_latency_ms": MAX_LATENCY_MS},
            "limits": {
                "max_image_bytes": self.config.max_image_bytes,
                "max_pixels": self.config.max_pixels,
                "max_batch_images": self.config.max_batch_images,
                "max_request_bytes": self.config.max_request_bytes,
                "default_top_k": self.config.top_k,
            },
        }


http_app.state.bentoml_service = Classifier  # routes.py merges its endpoints into this service's OpenAPI
