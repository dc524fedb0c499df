"""The BentoML service: one registered ONNX classifier behind POST /classify, POST /classify_batch, GET /model.

    bentoml serve tuneserve.service.service:Classifier          # or: tuneserve serve [--model TAG]

A thin shell: the plan (what to serve and how, service/plan.py) is made once, from the TUNESERVE_*
environment, because BentoML's decorator needs the worker count at import; each worker process then loads
the model into a ServedModel (session, batcher, admission, decoding pool: service/served_model.py), and
the routes (service/routes.py, mounted as an ASGI app) call it. BentoML provides the server, the worker
processes, /livez, /readyz, /metrics and tracing. No torch here: the serving image has onnxruntime, numpy
and Pillow only, and the service only loads registered tags (the CLI registers the built-in model).
"""
from __future__ import annotations

import contextlib
import logging

import bentoml

from tuneserve.service.batch_metrics import BATCH_SIZE_BUCKETS, BATCH_SIZE_METRIC
from tuneserve.service import http_protocol, lifecycle
from tuneserve.service.config import ServiceConfig
from tuneserve.service.decode_budget import limit_malloc_arenas
from tuneserve.service import health
from tuneserve.service.health import Health
from tuneserve.service.plan import ServingPlan
from tuneserve.service.routes import CLASSIFY_PATHS, JsonErrors, Probes, create_app
from tuneserve.service.served_model import ServedModel

# bentoml's server logging config leaves the root logger at WARNING; the start-up lines must show.
logging.getLogger("tuneserve.service").setLevel(logging.INFO)
# Importing tuneserve turned BentoML's usage reports off unless the user chose (tuneserve/__init__.py); the
# `bentoml serve` process may have read the variable before, so its cached answer is dropped.
with contextlib.suppress(ImportError, AttributeError):
    from bentoml._internal.utils.analytics import usage_stats

    usage_stats.do_not_track.cache_clear()


def _checked_plan() -> ServingPlan:
    plan = ServingPlan.resolve(ServiceConfig.from_env())
    if not lifecycle.in_worker():
        plan.check()  # in bentoml's main process, before any worker starts (service/lifecycle.py)
    return plan


PLAN = lifecycle.resolve_or_exit(_checked_plan)
lifecycle.arm_fatal_exit()
health.arm(lifecycle.in_worker())
# Images per inference call, as Prometheus sees them (GET /metrics): how well batching works under the load.
BATCH_SIZES = bentoml.metrics.Histogram(
    name=BATCH_SIZE_METRIC, documentation="images per onnxruntime call", buckets=BATCH_SIZE_BUCKETS,
)
REFUSED = bentoml.metrics.Counter(
    name="tuneserve_refused_requests", documentation="classify requests refused with 503 from their headers "
    "alone (admission), which BentoML's request metrics do not see", labelnames=["path"],
)
http_app = create_app(backend=lambda: bentoml.get_current_service().served,
                      openapi_base=lambda: Classifier.openapi_spec.asdict())
if lifecycle.in_worker():
    http_protocol.use_in_uvicorn()  # header limits and timeouts, JSON framing errors, cheap refusals
    limit_malloc_arenas()  # before the decoding and inference threads exist


@bentoml.service(
    name="tuneserve",
    workers=PLAN.workers,
    traffic={"timeout": PLAN.config.timeout_s},
    # Recorded in the Bento (and its Dockerfile) so that a built image serves exactly the packed version.
    envs=[{"name": "TUNESERVE_MODEL", "value": PLAN.model.tag}],
)
@bentoml.asgi_app(http_app, path="/")
class Classifier:
    """Image classification with a fine-tuned CNN exported to ONNX: POST /classify (one image, raw body
    or multipart field `image`), POST /classify_batch (multipart, one file part per image), GET /model."""

    model_ref = bentoml.models.BentoModel(PLAN.model.tag)  # `bentoml build` packs this exact version

    def __init__(self) -> None:
        # Loads and warms up the model; BentoML answers /readyz only after this returns.
        try:
            self.served = ServedModel(PLAN, on_batch=BATCH_SIZES.observe)
        except Exception as e:  # noqa: BLE001 - whatever it is, this worker cannot serve: stop, do not loop
            lifecycle.fail_worker(f"cannot serve {PLAN.model.tag} on {PLAN.device}: {type(e).__name__}: {e}")
        http_protocol.configure(self._refuse, PLAN.config.header_timeout_s)
        health.mark_ready()

    def _refuse(self, method: str, path: str) -> bytes | None:
        if method != "POST" or path not in CLASSIFY_PATHS:
            return None
        body = self.served.refusal()
        if body is not None:
            REFUSED.labels(path=path).inc()
        return body

    @bentoml.on_shutdown
    def _stop_pools(self) -> None:
        self.served.close()


Classifier.add_asgi_middleware(JsonErrors)
Classifier.add_asgi_middleware(Probes, health=Health(expected_workers=PLAN.workers).report, model=lambda: PLAN.model.tag)
