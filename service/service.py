"""The BentoML service: registered ONNX classifiers behind POST /classify, /models/{name}/classify and friends.

    bentoml serve tuneserve.service.service:Classifier          # or: tuneserve serve [--model TAG ...]

A thin shell: the plan (what to serve and how, service/plan.py) is made once, from the TUNESERVE_*
environment, because BentoML's decorator needs the worker count at import; each worker process then builds
a Worker (admission, decoding pool, engine thread, and the repository of models it serves:
service/worker.py), and the routes (service/routes.py, mounted as an ASGI app) call it. BentoML provides
the server, the worker processes, /metrics and tracing. No torch here: the serving image has onnxruntime,
numpy and Pillow only, and the service only loads registered tags (the CLI registers the built-in model).
"""
from __future__ import annotations

import contextlib
import logging
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

import bentoml
from bentoml.exceptions import BentoMLException
from bentoml.validators import ContentType

from tuneserve.service import health, http_protocol, lifecycle
from tuneserve.service.auth import ApiKeys, bearer, matches
from tuneserve.service.config import ServiceConfig
from tuneserve.service.decode_budget import limit_malloc_arenas
from tuneserve.service.health import Health
from tuneserve.service.metrics import PrometheusMetrics
from tuneserve.service.plan import ServingPlan
from tuneserve.service.inputs import HTTPError, ImageInput, too_large
from tuneserve.service.routes import (
    CLIENT_ROUTES,
    ClientRoutes,
    JsonErrors,
    Probes,
    classify_uploads,
    create_app,
    is_classify_path,
    is_known_path,
)
from tuneserve.service.worker import Worker

# bentoml's server logging config leaves the root logger at WARNING; the start-up lines must show.
logging.getLogger("tuneserve.service").setLevel(logging.INFO)
# Importing tuneserve turned BentoML's usage reports off unless the user chose (tuneserve/__init__.py); the
# `bentoml serve` process may have read the variable before, so its cached answer is dropped.
with contextlib.suppress(ImportError, AttributeError):
    from bentoml._internal.utils.analytics import usage_stats

    usage_stats.do_not_track.cache_clear()


def _checked_plan() -> tuple[ServingPlan, str | None, str | None]:
    plan = ServingPlan.resolve(ServiceConfig.from_env())
    if not lifecycle.in_worker():
        plan.check()  # in bentoml's main process, before any worker starts (service/lifecycle.py)
    return plan, plan.config.key("api"), plan.config.key("admin")


PLAN, API_KEY, ADMIN_KEY = lifecycle.resolve_or_exit(_checked_plan)
lifecycle.arm_fatal_exit()
health.arm(lifecycle.in_worker())
METRICS = PrometheusMetrics()
REFUSED = bentoml.metrics.Counter(
    name="tuneserve_refused_requests", documentation="classify requests refused with 503 from their headers "
    "alone (admission), which BentoML's request metrics do not see", labelnames=["path"],
)
http_app = create_app(backend=lambda: bentoml.get_current_service().worker,
                      openapi_base=lambda: Classifier.openapi_spec.asdict(), management=ADMIN_KEY is not None)
if lifecycle.in_worker():
    http_protocol.use_in_uvicorn()  # header limits and timeouts, JSON framing errors, cheap refusals
    limit_malloc_arenas()  # before the decoding and inference threads exist


class _Classifier:
    """Image classification with fine-tuned CNNs exported to ONNX: POST /classify (one image, raw body or
    multipart field `image`), POST /classify_batch (multipart, one file part per image), GET /model, and the
    same per model under /models/{name}/; GET /models lists them."""

    def __init__(self) -> None:
        # Loads and warms up the models; BentoML answers requests only after this returns.
        try:
            self.worker = Worker(PLAN, METRICS)
        except Exception as e:  # noqa: BLE001 - whatever it is, this worker cannot serve: stop, do not loop
            lifecycle.fail_worker(f"cannot serve {', '.join(m.tag for m in PLAN.models)} on {PLAN.device}: "
                                  f"{type(e).__name__}: {e}")
        http_protocol.configure(self._refuse, PLAN.config.header_timeout_s, is_known_path)
        health.mark_ready()

    def _refuse(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> bytes | None:
        if method != "POST" or not is_classify_path(path):
            return None
        if API_KEY is not None and not matches(bearer(headers), API_KEY):
            return None  # the 401 comes first: the route's middleware gives it
        body = self.worker.refusal()
        if body is not None:
            REFUSED.labels(path=path).inc()
        return body

    # BentoML's clients (bentoml.SyncHTTPClient(url).classify(image=...)) find these in /schema.json. Over HTTP
    # the service's own /classify and /classify_batch answer their routes (service/routes.py, ClientRoutes);
    # called in-process, these bodies take the same admission, decoding pool and batcher.
    @bentoml.api(route=next(k for k, v in CLIENT_ROUTES.items() if v == "/classify"))
    async def classify(self, image: Annotated[Path, ContentType("image/*")], top_k: int = PLAN.config.top_k) -> dict[str, Any]:
        """Classify one image with the default model: top-k predictions, best first."""
        return await self._uploads([image], top_k, batch=False)

    @bentoml.api(route=next(k for k, v in CLIENT_ROUTES.items() if v == "/classify_batch"))
    async def classify_batch(self, images: list[Annotated[Path, ContentType("image/*")]],
                             top_k: int = PLAN.config.top_k) -> dict[str, Any]:
        """Classify several images with the default model: one result per image, in order."""
        return await self._uploads(images, top_k, batch=True)

    async def _uploads(self, paths: list[Path], top_k: int, batch: bool) -> dict[str, Any]:
        try:
            limit = PLAN.config.max_image_bytes
            for p in paths:
                size = p.stat().st_size
                if size > limit:
                    raise too_large(f"image {p.name!r}", size, limit, "TUNESERVE_MAX_IMAGE_BYTES")
            images = [ImageInput(p.name, p.read_bytes()) for p in paths]
            return await classify_uploads(self.worker, images, top_k, batch)
        except HTTPError as e:  # BentoML answers its own exception with the status
            raise BentoMLException(e.message, error_code=HTTPStatus(e.status)) from None

    @bentoml.on_startup
    async def _start(self) -> None:
        await self.worker.start()

    @bentoml.on_shutdown
    def _stop(self) -> None:
        self.worker.close()


# `bentoml build` packs every model declared as a BentoModel attribute: the exact versions served at start.
for _i, _choice in enumerate(PLAN.models):
    setattr(_Classifier, f"model_ref_{_i}", bentoml.models.BentoModel(_choice.tag))

Classifier = bentoml.service(
    name="tuneserve",
    workers=PLAN.workers,
    traffic={"timeout": PLAN.config.timeout_s},
    # Recorded in the Bento (and its Dockerfile) so that a built image serves exactly the packed versions.
    envs=[{"name": "TUNESERVE_MODELS", "value": ",".join(m.tag for m in PLAN.models)},
          {"name": "TUNESERVE_DEFAULT_MODEL", "value": PLAN.default}],
)(bentoml.asgi_app(http_app, path="/")(_Classifier))
Classifier.add_asgi_middleware(ClientRoutes)
Classifier.add_asgi_middleware(JsonErrors)
Classifier.add_asgi_middleware(ApiKeys, api_key=API_KEY, admin_key=ADMIN_KEY, metrics_auth=PLAN.config.metrics_auth)
Classifier.add_asgi_middleware(Probes, health=Health(expected_workers=PLAN.workers).report,
                               model=lambda: PLAN.model.tag)
