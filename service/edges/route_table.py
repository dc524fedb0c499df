"""Every HTTP route the service answers, in one table: the single source of the app's routes
(routes.py), which key each needs (front.py), which paths exist at all (the HTTP protocol answers 404 for
the others from the request line, front.py), which ones admission may refuse from their headers, and
which the OpenAPI document describes (openapi.py). Adding a route is one line here and its handler.

Routes whose handler is None are answered by BentoML itself (its probes, metrics, Swagger UI, the API
functions BentoML's clients call) or by the front middleware (the probes, answered before BentoML's).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.routing import compile_path

OPEN, API, ADMIN, METRICS = "open", "api", "admin", "metrics"  # which key a route needs (front.py)


@dataclass(frozen=True)
class Route:
    path: str  # Starlette's path syntax: {name} is one segment, {path:path} the rest
    method: str
    handler: str | None  # the method of routes.Handlers or oip_routes.OipHandlers; None: not ours (above)
    access: str = API  # OPEN, API (TUNESERVE_API_KEY), ADMIN (TUNESERVE_ADMIN_KEY), METRICS (API if TUNESERVE_METRICS_AUTH)
    classify: bool = False  # takes images: admission may refuse it from its request line and headers
    management: bool = False  # exists only when there is an admin key

    @property
    def documented(self) -> bool:
        """Described by openapi.py (BentoML documents its own routes)."""
        return self.handler is not None and self.handler != "openapi"


_MODEL = "/models/{name}"
_V2_MODEL = "/v2/models/{name}"
_V2_VERSION = "/v2/models/{name}/versions/{version}"

ROUTES: tuple[Route, ...] = (
    # tuneserve's REST API (routes.Handlers)
    Route("/classify", "POST", "classify", classify=True),
    Route("/classify_batch", "POST", "classify_batch", classify=True),
    Route("/model", "GET", "model_info"),
    Route("/models", "GET", "list_models"),
    Route(_MODEL, "GET", "one_model"),
    Route(f"{_MODEL}/classify", "POST", "classify", classify=True),
    Route(f"{_MODEL}/classify_batch", "POST", "classify_batch", classify=True),
    Route("/explain", "POST", "explain", classify=True),
    Route(f"{_MODEL}/explain", "POST", "explain", classify=True),
    Route("/docs.json", "GET", "openapi", access=OPEN),  # BentoML's document, with these routes added
    # the Open Inference Protocol (oip_routes.OipHandlers); its health probes are the front's
    Route("/v2", "GET", "server_metadata"),
    *(r for base in (_V2_MODEL, _V2_VERSION) for r in (
        Route(base, "GET", "model_metadata"),
        Route(f"{base}/ready", "GET", "model_ready"),
        Route(f"{base}/config", "GET", "model_config"),
        Route(f"{base}/infer", "POST", "infer", classify=True))),
    # the management API (explicit model control; only with an admin key)
    Route("/v2/repository/index", "POST", "repository_index", access=ADMIN, management=True),
    Route("/v2/repository/models/{name}/load", "POST", "load", access=ADMIN, management=True),
    Route("/v2/repository/models/{name}/unload", "POST", "unload", access=ADMIN, management=True),
    Route("/v2/repository/models/{name}/rollback", "POST", "rollback", access=ADMIN, management=True),
    # answered by the front middleware (front.py): liveness and readiness for every worker
    *(Route(p, "GET", None, access=OPEN) for p in ("/livez", "/readyz", "/v2/health/live", "/v2/health/ready")),
    # answered by BentoML
    Route("/healthz", "GET", None, access=OPEN),
    Route("/metrics", "GET", None, access=METRICS),
    Route("/", "GET", None, access=OPEN),  # the Swagger UI
    Route("/schema.json", "GET", None, access=OPEN),
    Route("/static_content/{path:path}", "GET", None, access=OPEN),
    Route("/assets/{path:path}", "GET", None, access=OPEN),
    # BentoML's clients call the service's API functions (service/service.py) here; the front answers them
    # with /classify and /classify_batch (CLIENT_ROUTES)
    Route("/bentoml/classify", "POST", None, classify=True),
    Route("/bentoml/classify_batch", "POST", None, classify=True),
)

# BentoML clients' routes -> the routes that answer them.
CLIENT_ROUTES = {"/bentoml/classify": "/classify", "/bentoml/classify_batch": "/classify_batch"}


class RouteTable:
    """Questions about a path, answered from ROUTES (compiled once)."""

    def __init__(self, routes: tuple[Route, ...] = ROUTES, management: bool = False):
        self.routes = tuple(r for r in routes if management or not r.management)
        self._compiled = [(compile_path(r.path)[0], r) for r in self.routes]
        # One expression per question the HTTP protocol asks of every request (named groups dropped: names repeat).
        self._known = _one_expression(rx for rx, _ in self._compiled)
        self._classify = {method: _one_expression(rx for rx, r in self._compiled if r.classify and r.method == method)
                          for method in {r.method for r in self.routes if r.classify}}

    def matching(self, path: str) -> list[Route]:
        return [r for rx, r in self._compiled if rx.match(path)]

    def is_known(self, path: str) -> bool:
        """Some route serves `path` (with some method)."""
        return self._known.match(path) is not None

    def is_classify(self, method: str, path: str) -> bool:
        rx = self._classify.get(method)
        return rx is not None and rx.match(path) is not None

    def access(self, path: str) -> str:
        """The key a request to `path` needs; API for a path no route serves (it is answered 404 anyway)."""
        found = self.matching(path)
        return found[0].access if found else API

    def handled(self) -> list[Route]:
        """The routes the app's own handlers answer, in table order."""
        return [r for r in self.routes if r.handler is not None]


def _one_expression(compiled) -> re.Pattern:
    return re.compile("|".join(re.sub(r"\(\?P<\w+>", "(?:", rx.pattern) for rx in compiled))
