"""The BentoML service: registered ONNX classifiers behind POST /classify, /models/{name}/classify and friends.

    bentoml serve tuneserve.service.service:Classifier          # or: tuneserve serve [--model TAG ...]

A thin shell that wires the pieces together, each handed its collaborators: the plan (what to serve and how,
plan.py) is resolved once, by `tuneserve serve` or by BentoML's main process, and read by every worker from
TUNESERVE_PLAN; each worker makes one Engine (service/engine/) with its Admission, mounts the HTTP edge
(service/edges/routes.py) on it, puts the Front middleware before BentoML's app, and hands the HTTP protocol its
HeaderChecks through the lifespan state. BentoML provides the server, the worker processes, /metrics and
tracing. No torch here: the serving image has onnxruntime, numpy and Pillow only, and the service only loads
registered tags (the CLI registers the built-in model).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

import bentoml
from bentoml.exceptions import BentoMLException
from bentoml.validators import ContentType

from tuneserve.service import health, lifecycle
from tuneserve.service.config import ServiceConfig, check_exposure
from tuneserve.service.edges import grpc_edge
from tuneserve.service.edges.front import Front, Keys, header_checks, use_in_uvicorn
from tuneserve.service.edges.route_table import CLIENT_ROUTES, RouteTable
from tuneserve.service.edges.routes import batch_results, create_app, parse_top_k, predictions
from tuneserve.service.engine.decode_budget import limit_malloc_arenas
from tuneserve.service.engine.engine import Engine, ImageInput, admission_for
from tuneserve.service.engine.errors import RequestError, too_large
from tuneserve.service.engine.metrics import PrometheusMetrics
from tuneserve.service.health import Health
from tuneserve.service.plan import PLAN_ENV, ServingPlan

# bentoml's server logging config leaves the root logger at WARNING; the start-up lines must show.
logging.getLogger("tuneserve.service").setLevel(logging.INFO)
# Importing tuneserve turned BentoML's usage reports off unless the user chose (tuneserve/__init__.py); the
# `bentoml serve` process may have read the variable before, so its cached answer is dropped.
with contextlib.suppress(ImportError, AttributeError):
    from bentoml._internal.utils.analytics import usage_stats

    usage_stats.do_not_track.cache_clear()


def _plan() -> ServingPlan:
    """The plan handed over in TUNESERVE_PLAN; in BentoML's main process without one, resolved and checked here
    (before any worker starts) and handed to the workers the same way. Imported elsewhere (`bentoml build`,
    tests), the plan is resolved and nothing else happens."""
    config = ServiceConfig.from_env()
    plan = ServingPlan.from_env(config)
    if plan is not None:
        return plan
    if lifecycle.in_worker():
        raise RuntimeError(f"{PLAN_ENV} is not set: workers serve the plan their main process resolved")
    plan = ServingPlan.resolve(config)
    plan.check()
    host = _serve_host()
    if host is not None:
        check_exposure(config, host)
        os.environ.update(plan.to_env())  # the workers inherit it
    return plan


def _serve_host() -> str | None:
    """The address `bentoml serve` was asked to listen on (its --host flag or BENTOML_HOST; its default
    0.0.0.0), or None when this process is not `bentoml serve`: the service module is imported before it
    binds, with no other way to ask."""
    argv = sys.argv
    if "serve" not in argv[1:3]:
        return None
    for i, arg in enumerate(argv):
        if arg == "--host" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return os.environ.get("BENTOML_HOST") or "0.0.0.0"


PLAN = lifecycle.resolve_or_exit(_plan)
KEYS = lifecycle.resolve_or_exit(lambda: Keys(PLAN.config.key("api"), PLAN.config.key("admin"), PLAN.config.metrics_auth))
lifecycle.arm_fatal_exit()
if not lifecycle.in_worker():  # the gRPC port checked once, and the HTTP address handed to the workers for it
    lifecycle.resolve_or_exit(lambda: grpc_edge.arm(PLAN.config.grpc_port, _serve_host()))
health.arm(lifecycle.in_worker())
TABLE = RouteTable(management=KEYS.admin is not None)
ADMISSION = admission_for(PLAN)
METRICS = PrometheusMetrics()  # once per process: Prometheus metrics register their names once
REFUSED = bentoml.metrics.Counter(
    name="tuneserve_refused_requests", documentation="classify requests refused with 503 from their headers "
    "alone (admission), which BentoML's request metrics do not see", labelnames=["path"])


HEALTH = Health(expected_workers=PLAN.workers)
HEADER_CHECKS = header_checks(PLAN.config, TABLE, KEYS, ADMISSION, on_refused=lambda path: REFUSED.labels(path=path).inc())
http_app = create_app(engine=lambda: bentoml.get_current_service().engine,
                      openapi_base=lambda: Classifier.openapi_spec.asdict(), management=KEYS.admin is not None)
if lifecycle.in_worker():
    lifecycle.resolve_or_exit(use_in_uvicorn)  # header limits and timeouts, JSON framing errors, cheap and paced refusals
    limit_malloc_arenas()  # before the decoding and inference threads exist


class _Classifier:
    """Image classification with fine-tuned CNNs exported to ONNX: POST /classify (one image, raw body or
    multipart field `image`), POST /classify_batch (multipart, one file part per image), GET /model, and the
    same per model under /models/{name}/; GET /models lists them."""

    def __init__(self) -> None:
        # Loads and warms up the models; BentoML answers requests only after this returns.
        try:
            self.engine = Engine(PLAN, METRICS, ADMISSION)
        except Exception as e:  # noqa: BLE001 - whatever it is, this worker cannot serve: stop, do not loop
            lifecycle.fail_worker(f"cannot serve {', '.join(m.tag for m in PLAN.models)} on {PLAN.device}: "
                                  f"{type(e).__name__}: {e}")
        # What start-up made (BentoML, onnxruntime, the loaded models) lives as long as the worker: frozen, the
        # cyclic collector's full passes no longer walk it. Unfrozen, each full pass took ~80 ms and freed nothing
        # while holding the GIL, so the event loop and every request stood still (2 such passes in 15 s at 16
        # connections; docs/benchmarks.md "Goodput under a flood").
        gc.freeze()
        health.mark_ready()

    # BentoML's clients (bentoml.SyncHTTPClient(url).classify(image=...)) find these in /schema.json. Over HTTP
    # the front answers their routes with /classify and /classify_batch (route_table.CLIENT_ROUTES); called
    # in-process, these bodies make the same engine call.
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
        cfg = PLAN.config
        try:
            if not paths:
                raise RequestError(400, "no image was given")
            top_k = parse_top_k(str(top_k), cfg.top_k, len(self.engine.model(None).labels))
            if batch and len(paths) > cfg.max_batch_images:
                raise RequestError(413, f"too many images in one request: the limit is {cfg.max_batch_images} "
                                        "(server setting TUNESERVE_MAX_BATCH_IMAGES)")
            for p in paths:
                if p.stat().st_size > cfg.max_image_bytes:
                    raise too_large(f"image {p.name!r}", p.stat().st_size, cfg.max_image_bytes, "TUNESERVE_MAX_IMAGE_BYTES")
            images = [ImageInput(p.name, p.read_bytes()) for p in paths]
            result = await self.engine.classify(None, images, per_image_errors=batch)
            return batch_results(result, images, top_k) if batch else predictions(result, top_k)
        except RequestError as e:  # BentoML answers its own exception with the status
            raise BentoMLException(e.message, error_code=HTTPStatus(e.status)) from None

    @bentoml.on_startup
    async def _start(self) -> None:
        await self.engine.start()
        self.grpc = None
        if PLAN.config.grpc_port:  # in this worker's event loop, on the engine just made
            try:
                self.grpc = await grpc_edge.start(self.engine, KEYS, HEALTH.report, PLAN.config.grpc_port,
                                                  on_refused=lambda rpc: REFUSED.labels(path=rpc).inc())
            except OSError as e:
                lifecycle.fail_worker(str(e))

    @bentoml.on_shutdown
    async def _stop(self) -> None:
        if getattr(self, "grpc", None) is not None:
            await grpc_edge.stop(self.grpc)
        self.engine.close()


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
Classifier.add_asgi_middleware(Front, table=TABLE, keys=KEYS, checks=HEADER_CHECKS,
                               health=HEALTH.report, model=lambda: PLAN.model.tag)
