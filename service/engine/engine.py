"""The engine: everything a worker process does for a request, behind one call.

    engine = Engine(plan, metrics, admission)        # loads and warms up the plan's models (blocking)
    result = await engine.classify("flowers", [ImageInput("a.jpg", data)])   # -> Classification

One per BentoML worker (service/service.py), or built directly by tests and benchmarks. It owns the model
versions (versions.py), the admission and latency bound (admission.py), and what the versions share: the
decoding pool and its memory budget, the engine thread, the GPU JPEG decoder (model_version.Shared), which it
hands down to each version it loads; nothing below holds a reference back up. The edges (service/edges/) parse
a protocol, call `classify`, and encode the Classification; the only other thing they ask is `refusal()`, the
admission's verdict on a request from its headers alone.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from tuneserve.models.runtime import top_k
from tuneserve.service.config import ServiceConfig
from tuneserve.service.engine.admission import Admission, lower_thread_priority
from tuneserve.service.engine.decode_budget import DecodeBudget
from tuneserve.service.engine.errors import RequestError, too_large
from tuneserve.service.engine.metrics import Metrics
from tuneserve.service.engine.model_version import ModelVersion, Shared
from tuneserve.service.engine.versions import ModelVersions
from tuneserve.service.gpu_decode import GpuJpegDecoder
from tuneserve.service.plan import ModelChoice, ServingPlan


@dataclass(frozen=True)
class ImageInput:
    name: str  # multipart filename, "body" for a raw upload, the input's index for the v2 protocol
    data: bytes  # the encoded image (JPEG, PNG, ...)


@dataclass
class Classification:
    """The engine's answer: the version that ran, and per image its probabilities float32 (classes,) in the
    labels' order, or the RequestError that image got (only when the call asked for per-image errors); with
    `explain`, per image its class activation maps float32 (classes, h, w) (None for a failed image)."""

    model: ModelVersion
    results: list[np.ndarray | RequestError]
    cams: list[np.ndarray | None] | None = None

    def top(self, probs: np.ndarray, k: int) -> list[dict[str, Any]]:
        return top_k(probs, self.model.labels, k)


def admission_for(plan: ServingPlan) -> Admission:
    """The admission a worker serving `plan` uses (made before the engine: the HTTP edge needs it first)."""
    return Admission(plan.max_latency_ms / 1000, plan.config.max_in_flight, parallelism=plan.preprocess_threads)


def _jpeg_decoder(plan: ServingPlan) -> tuple[GpuJpegDecoder | None, str]:
    """The GPU JPEG decoder where the plan runs on CUDA and it loads and agrees with the CPU path (its start-up
    check, service/gpu_decode.py), and what decodes JPEGs, with the reason."""
    if plan.device != "cuda":
        return None, "cpu (Pillow): the model runs on the CPU"
    if plan.config.gpu_decode != "auto":
        return None, "cpu (Pillow): TUNESERVE_GPU_DECODE=off"
    return GpuJpegDecoder.try_load(pp=plan.model.stored.card.preprocessing)


class Engine:
    def __init__(self, plan: ServingPlan, metrics: Metrics | None = None, admission: Admission | None = None):
        self.plan = plan
        self.metrics = metrics or Metrics()
        self.admission = admission or admission_for(plan)
        gpu_decoder, decoder_status = _jpeg_decoder(plan)
        self.shared = Shared(
            plan=plan,
            pool=ThreadPoolExecutor(plan.preprocess_threads, thread_name_prefix="tuneserve-preprocess",
                                    initializer=lower_thread_priority),
            engine=ThreadPoolExecutor(1, thread_name_prefix="tuneserve-infer", initializer=lower_thread_priority),
            decode_budget=DecodeBudget(plan.config.decode_memory_mb * 2**20, plan.preprocess_threads),
            gpu_decoder=gpu_decoder,
            decoder_status=decoder_status,
            metrics=self.metrics,
        )
        self.versions = ModelVersions(plan, self._load, self.metrics)

    @property
    def config(self) -> ServiceConfig:
        return self.plan.config

    def _load(self, choice: ModelChoice) -> ModelVersion:
        return ModelVersion(choice, self.shared)

    def model(self, name: str | None, version: str | None = None) -> ModelVersion:
        """The version of model `name` (None: the default model) served now; RequestError 404 naming the
        served ones when there is none, or when `version` is given and is not the one served."""
        served = self.versions.get(name)
        if version is not None and version != served.version:
            raise RequestError(404, f"model {served.name!r} version {version!r} is not served here; it serves "
                                    f"version {served.version!r}")
        return served

    def refusal(self, images: int = 1) -> RequestError | None:
        """The 503 a request of `images` would get now, judged before its body is read; None: it is taken."""
        return self.admission.refusal(images)

    async def classify(self, name: str | None, images: Sequence[ImageInput] | np.ndarray, *,
                       version: str | None = None, per_image_errors: bool = False,
                       explain: bool = False, arrived: float | None = None) -> Classification:
        """Probabilities for `images` (encoded images, or an array (N, ...) already in the model's input form:
        uint8 (N, S, S, 3), or float32 (N, 3, S, S) for models that take it normalised) from model `name`
        (None: the default) at `version` (None: whichever is served). Admission, decoding in the shared pool,
        the version's batcher and the latency bound all happen here. An image that cannot be decoded fails
        the whole call (RequestError 4xx), or with `per_image_errors` gets its own error in the results while
        the others are classified; a call out of time is a 503. `explain`: the class activation maps too, from
        the same batches (a 422 for a model exported without them). `arrived`: when the edge began the request
        (time.monotonic), so that the bound also covers reading and parsing its body; None: now."""
        started, status = time.monotonic(), 500
        model = self.model(name, version)
        if explain and not model.can_explain:
            raise RequestError(422, f"{model.tag} was exported before tuneserve added class activation maps, so it "
                                    "cannot explain its answers (it still classifies): re-export its run with "
                                    "`tuneserve export RUN_DIR` and serve the new version")
        try:
            with model.in_use(), self.admission.admitted(len(images)):
                result = await self._classify(model, images, per_image_errors, explain, arrived)
            status = 200
            return result
        except RequestError as e:
            status = e.status
            raise
        finally:
            self.metrics.request(model.name, model.version, status, time.monotonic() - started)

    async def _classify(self, model: ModelVersion, images: Sequence[ImageInput] | np.ndarray,
                        per_image_errors: bool, explain: bool = False, arrived: float | None = None) -> Classification:
        deadline = self.admission.deadline(arrived)
        if isinstance(images, np.ndarray):
            prepared: list[np.ndarray | RequestError] = list(images)  # already the model's input
        else:
            prepared = list(await asyncio.gather(*(self._prepare(model, image, deadline) for image in images)))
        errors = [p for p in prepared if isinstance(p, RequestError)]
        late = next((e for e in errors if e.status == 503), None)
        if late is not None:
            raise late  # the request as a whole is out of time
        if errors and not per_image_errors:
            raise errors[0]
        good = [p for p in prepared if isinstance(p, np.ndarray)]
        answers: list[tuple[np.ndarray, np.ndarray | None]] = []
        if good:
            out = await model.classify(good, deadline, explain=explain)
            answers = list(zip(*out)) if explain else [(probs, None) for probs in out]
        if deadline.expired():
            raise deadline.late("before the answer was ready")
        # Each image's (probabilities, maps), or (its error, None), in the request's order.
        answered = iter(answers)
        per_image = [(p, None) if isinstance(p, RequestError) else next(answered) for p in prepared]
        return Classification(model, [r for r, _ in per_image], [m for _, m in per_image] if explain else None)

    async def _prepare(self, model: ModelVersion, image: ImageInput, deadline) -> np.ndarray | RequestError:
        limit = self.config.max_image_bytes
        try:
            if len(image.data) > limit:
                raise too_large(f"image {image.name!r}", len(image.data), limit, "TUNESERVE_MAX_IMAGE_BYTES")
            return await model.preprocess(image.data, deadline)
        except RequestError as e:
            return e

    async def start(self) -> None:
        """Background work on the event loop: poll mode's look at the store, explicit mode's sync between
        workers (versions.py)."""
        await self.versions.start()

    def close(self) -> None:
        self.versions.close()
        if self.shared.gpu_decoder is not None:
            self.shared.gpu_decoder.close()
        self.shared.pool.shutdown(wait=False, cancel_futures=True)
        self.shared.engine.shutdown(wait=False, cancel_futures=True)
