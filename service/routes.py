"""The HTTP endpoints: a small Starlette app, made by `create_app(backend)`, that the BentoML service mounts.

Why not plain `@bentoml.api` endpoints: /classify must take the image as the raw request body as well as a
multipart upload, and BentoML parses the body itself (as JSON unless it is multipart) before an API
function runs, answering bad input with its own error shapes. Here every byte is ours: bodies are
size-checked while they stream in, and each failure is a 4xx `{"error": "..."}` that says what to send
instead. BentoML still provides the server, workers, /livez, /readyz, /metrics and tracing.

The routes know the service only through `Backend`, the few members they call; `create_app` takes a
function that returns it, called once, at the first request (the BentoML service instance exists by then).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import time
from typing import Any, Awaitable, Callable, ContextManager, Iterator, Protocol

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import tuneserve
from tuneserve.models.runtime import top_k
from tuneserve.service.admission import Deadline
from tuneserve.service.config import ServiceConfig
from tuneserve.service.metrics import Metrics
from tuneserve.service.http_protocol import ORIGINAL_PATH, admitted_from_headers
from tuneserve.service.oip_routes import OipRoutes, oip_paths
from tuneserve.service.openapi import openapi_paths, security_schemes
from tuneserve.service.inputs import (
    MULTIPART_OVERHEAD_PER_PART,
    HTTPError,
    ImageInput,
    is_multipart,
    parse_top_k,
    read_body,
    read_form,
    too_large,
)

log = logging.getLogger("tuneserve.service")

Handler = Callable[[Request], Awaitable[Response]]

# The routes admission may refuse from the request line alone (service/http_protocol.py).
_CLASSIFY_PATH = re.compile(r"^((/models/[^/]+|/bentoml)?/classify(_batch)?|/v2/models/[^/]+(/versions/[^/]+)?/infer)$")


def is_classify_path(path: str) -> bool:
    return _CLASSIFY_PATH.match(path) is not None


# Every path the service answers (its routes, BentoML's, the Swagger UI's files), for http_protocol's metrics hygiene.
_KNOWN_PATH = re.compile(
    r"^(/|/classify|/classify_batch|/model|/models|/models/[^/]+(/classify(_batch)?)?|/healthz|/livez|/readyz|/metrics"
    r"|/docs\.json|/schema\.json|/bentoml/classify(_batch)?|/v2/repository/index"
    r"|/v2/repository/models/[^/]+/(load|unload|rollback)|/v2|/v2/health/(live|ready)"
    r"|/v2/models/[^/]+(/versions/[^/]+)?(/ready|/config|/infer)?"
    r"|/(static_content|assets)/.*)$")


def is_known_path(path: str) -> bool:
    return _KNOWN_PATH.match(path) is not None


class ServedVersion(Protocol):
    """One model version being served (service/served_model.py)."""

    name: str
    version: str
    tag: str  # "name:version"
    labels: list[str]
    input_size: int  # S of the S x S images classify() takes
    takes_pixels: bool  # classify() takes uint8 (S, S, 3) pixels; False: float32 (3, S, S), normalised

    def in_use(self) -> ContextManager[Any]: ...  # while a request uses it, a switch waits for it

    async def preprocess(self, data: bytes, deadline: Deadline) -> np.ndarray: ...  # -> one image's input; HTTPError

    async def classify(self, arrays: list[np.ndarray], deadline: Deadline) -> np.ndarray: ...  # -> float32 (N, classes)

    def describe(self) -> dict[str, Any]: ...  # GET /model


class Backend(Protocol):
    """What the routes need from the service: a worker and its models (service/worker.py implements it)."""

    @property
    def config(self) -> ServiceConfig: ...  # request limits, the default top_k, the model control mode

    @property
    def models(self) -> Any: ...  # the ModelRepository: describe(), describe_one(), previous_version(), change()

    @property
    def metrics(self) -> Metrics: ...

    def get(self, name: str | None) -> ServedVersion: ...  # None: the default model; HTTPError 404

    def deadline(self) -> Deadline: ...  # for a request arriving now

    def check_capacity(self) -> None: ...  # HTTPError 503 when a new request would be refused anyway

    def admit(self, images: int, estimate: bool = True) -> ContextManager[None]: ...  # in flight; HTTPError 503

    def late(self, deadline: Deadline, stage: str) -> HTTPError: ...  # the 503 for a deadline passed at `stage`


def json_errors(handler: Handler) -> Handler:
    """HTTPError -> its 4xx/503 JSON answer; anything else -> a logged 500 that still speaks JSON."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except HTTPError as e:
            return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return JSONResponse({"error": "internal server error; the server log has the details"}, status_code=500)

    return wrapper


def _check_image_size(image: ImageInput, limit: int) -> None:
    if len(image.data) > limit:
        raise too_large(f"image {image.name!r}", len(image.data), limit, "TUNESERVE_MAX_IMAGE_BYTES")


async def classify_one(b: Backend, model: ServedVersion, image: ImageInput, k: int, estimate: bool = True) -> dict:
    """One image -> {"model", "predictions"}: admission, the decoding pool, the model's batcher, the deadline.
    `estimate`: admission still has to judge the request (it was not judged from its headers)."""
    _check_image_size(image, b.config.max_image_bytes)
    deadline = b.deadline()  # the latency bound counts from the whole request's arrival
    with b.admit(1, estimate=estimate):
        array = await model.preprocess(image.data, deadline)
        probs = await model.classify([array], deadline)
        if deadline.expired():
            raise b.late(deadline, "before the answer was ready")
    return {"model": model.tag, "predictions": top_k(probs[0], model.labels, k)}


async def classify_many(b: Backend, model: ServedVersion, images: list[ImageInput], k: int) -> dict:
    """Several images -> {"model", "results"}: one result per image, in order; an image that cannot be decoded
    gets its own error and status while the others are classified."""
    deadline = b.deadline()

    async def prepare(image: ImageInput) -> np.ndarray | HTTPError:
        try:
            _check_image_size(image, b.config.max_image_bytes)
            return await model.preprocess(image.data, deadline)
        except HTTPError as e:
            return e

    with b.admit(len(images)):
        prepared = await asyncio.gather(*(prepare(f) for f in images))
        late = next((p for p in prepared if isinstance(p, HTTPError) and p.status == 503), None)
        if late is not None:
            raise late  # the request as a whole is out of time
        good = [p for p in prepared if isinstance(p, np.ndarray)]
        probs = iter(await model.classify(good, deadline) if good else [])
        if deadline.expired():
            raise b.late(deadline, "before the answer was ready")
    results: list[dict[str, Any]] = []
    for image, p in zip(images, prepared):
        if isinstance(p, HTTPError):
            results.append({"filename": image.name, "error": p.message, "status": p.status})
        else:
            results.append({"filename": image.name, "predictions": top_k(next(probs), model.labels, k)})
    return {"model": model.tag, "results": results}


async def classify_uploads(b: Backend, images: list[ImageInput], k: int, batch: bool) -> dict:
    """The default model's /classify (batch False) or /classify_batch answer for images that came in some other
    way than these routes: the BentoML API functions (service/service.py) called in-process."""
    b.check_capacity()
    with b.get(None).in_use() as model:
        k = parse_top_k(str(k), b.config.top_k, len(model.labels))
        if not images:
            raise HTTPError(400, "no image was given")
        if batch:
            if len(images) > b.config.max_batch_images:
                raise HTTPError(413, f"too many images in one request: the limit is {b.config.max_batch_images} "
                                     "(server setting TUNESERVE_MAX_BATCH_IMAGES)")
            return await classify_many(b, model, images, k)
        return await classify_one(b, model, images[0], k)


# BentoML's clients call the routes of the service's @bentoml.api functions (service/service.py), which
# BentoML's router would match before this app: over HTTP they are answered here, by /classify and
# /classify_batch, whose multipart fields (`image`/`images` files, `top_k`) are the functions' parameters.
CLIENT_ROUTES = {"/bentoml/classify": "/classify", "/bentoml/classify_batch": "/classify_batch"}


class ClientRoutes:
    """ASGI middleware: BentoML clients' API routes -> the routes here (CLIENT_ROUTES)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in CLIENT_ROUTES:
            path = CLIENT_ROUTES[scope["path"]]
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


class Routes:
    """The handlers, bound to the backend that `resolve()` returns."""

    def __init__(self, resolve: Callable[[], Backend]):
        self._resolve = resolve

    @functools.cached_property
    def backend(self) -> Backend:
        return self._resolve()

    def _model(self, request: Request) -> ServedVersion:
        return self.backend.get(request.path_params.get("name"))

    def admit_early(self, request: Request) -> None:
        """Capacity, before a possibly large body is read (unless admission already judged the request from its
        headers, service/http_protocol.py)."""
        if not admitted_from_headers(request.scope):
            self.backend.check_capacity()

    def _admit_request(self, request: Request, model: ServedVersion) -> int:
        """Common start of both classify routes: capacity and a bad query-string top_k are refused before the
        body is read. Returns top_k."""
        self.admit_early(request)
        return parse_top_k(request.query_params.get("top_k"), self.backend.config.top_k, len(model.labels))

    async def classify(self, request: Request) -> Response:
        with self._model(request).in_use() as model, self.measured(model):
            return await self._classify(request, model)

    async def classify_batch(self, request: Request) -> Response:
        with self._model(request).in_use() as model, self.measured(model):
            return await self._classify_batch(request, model)

    @contextlib.contextmanager
    def measured(self, model: ServedVersion) -> Iterator[None]:
        """Count the request under its model and version, with its status and time."""
        started, status = time.monotonic(), 500
        try:
            yield
            status = 200
        except HTTPError as e:
            status = e.status
            raise
        finally:
            self.backend.metrics.request(model.name, model.version, status, time.monotonic() - started)

    async def _classify(self, request: Request, model: ServedVersion) -> Response:
        b, cfg = self.backend, self.backend.config
        k = self._admit_request(request, model)
        if is_multipart(request):
            body = await read_body(request, cfg.max_image_bytes + MULTIPART_OVERHEAD_PER_PART, "TUNESERVE_MAX_IMAGE_BYTES",
                                   cfg.body_timeout_s)
            files, fields = await read_form(request, body, 1, HTTPError(
                400, "/classify takes one image; send several to /classify_batch (one file part each)"))
            if not files:
                raise HTTPError(400, "no file in the multipart form: send the image in a file field named 'image' "
                                     f"(e.g. curl -F image=@photo.jpg); text fields received: {sorted(fields) or 'none'}")
            image = files[0]
            if "top_k" in fields:
                k = parse_top_k(fields["top_k"], cfg.top_k, len(model.labels))
        else:
            # Anything that is not multipart is the image itself, whatever Content-Type says (curl's
            # --data-binary sends application/x-www-form-urlencoded): the decoder recognises the format.
            image = ImageInput("body", await read_body(request, cfg.max_image_bytes, "TUNESERVE_MAX_IMAGE_BYTES",
                                                       cfg.body_timeout_s))
        return JSONResponse(await classify_one(b, model, image, k, estimate=not admitted_from_headers(request.scope)))

    async def _classify_batch(self, request: Request, model: ServedVersion) -> Response:
        b, cfg = self.backend, self.backend.config
        k = self._admit_request(request, model)
        if not is_multipart(request):
            raise HTTPError(415, "/classify_batch takes multipart/form-data with one file part per image "
                                 "(e.g. curl -F images=@a.jpg -F images=@b.jpg); for one raw image use /classify")
        body = await read_body(request, cfg.max_request_bytes, "TUNESERVE_MAX_REQUEST_BYTES", cfg.body_timeout_s)
        files, fields = await read_form(request, body, cfg.max_batch_images, HTTPError(
            413, f"too many images in one request: the limit is {cfg.max_batch_images} (server setting "
                 "TUNESERVE_MAX_BATCH_IMAGES); split them over several requests"))
        if not files:
            raise HTTPError(400, "no file in the multipart form: send each image as a file part, e.g. "
                                 f"curl -F images=@a.jpg -F images=@b.jpg; text fields received: {sorted(fields) or 'none'}")
        if "top_k" in fields:
            k = parse_top_k(fields["top_k"], cfg.top_k, len(model.labels))
        return JSONResponse(await classify_many(b, model, files, k))

    async def model_info(self, request: Request) -> Response:
        return JSONResponse(self.backend.get(None).describe())

    async def list_models(self, request: Request) -> Response:
        models = self.backend.models
        return JSONResponse({"default": models.default, "models": models.describe()})

    async def one_model(self, request: Request) -> Response:
        return JSONResponse(self.backend.models.describe_one(request.path_params["name"]))

    # -- the management API (explicit model control; only with an admin key, service/auth.py) --------------------

    async def repository_index(self, request: Request) -> Response:
        """Triton's repository index: every model this worker knows, with its version and state."""
        return JSONResponse([{"name": m["name"], "version": m["version"] or "", "state": m["state"].upper(),
                              "reason": m["error"] or ""} for m in self.backend.models.describe()])

    async def load(self, request: Request) -> Response:
        """Load `name` at the version in the body ({"version": "..."}; none: its newest) on every worker."""
        models, name = self._explicit(), request.path_params["name"]
        version = (await _json_body(request)).get("version")
        if version is not None and not isinstance(version, str):
            raise HTTPError(400, f"version must be a string, got {version!r}")
        from tuneserve.models.store import ModelNotFoundError, load_model

        try:  # one concrete version for every worker, even when the store changes meanwhile
            stored = await asyncio.to_thread(load_model, f"{name}:{version}" if version else name)
        except ModelNotFoundError as e:
            raise HTTPError(404, str(e)) from None
        return JSONResponse(await self._change(models, name, {"version": stored.version}))

    async def unload(self, request: Request) -> Response:
        models, name = self._explicit(), request.path_params["name"]
        models.get(name)  # 404 for a model not served
        return JSONResponse(await self._change(models, name, {"unloaded": True}))

    async def rollback(self, request: Request) -> Response:
        models, name = self._explicit(), request.path_params["name"]
        return JSONResponse(await self._change(models, name, {"version": models.previous_version(name)}))

    def _explicit(self) -> Any:
        mode = self.backend.config.model_control
        if mode != "explicit":
            raise HTTPError(409, f"model control is {mode!r}: versions change through the management API only with "
                                 "TUNESERVE_MODEL_CONTROL=explicit")
        return self.backend.models

    async def _change(self, models: Any, name: str, want: dict[str, Any]) -> dict[str, Any]:
        from tuneserve.service.repository import ModelLoadFailed

        try:
            return await models.change(name, want)
        except ModelLoadFailed as e:
            raise HTTPError(422, f"{e}; the version before keeps serving") from None


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await read_body(request, 64 * 1024, "the management API's body limit (64 KiB)", 10)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise HTTPError(400, "the body must be JSON, e.g. {\"version\": \"abc123\"}") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object, e.g. {\"version\": \"abc123\"}")
    return {**body.get("parameters", {}), **body} if isinstance(body.get("parameters"), dict) else body


def create_app(backend: Callable[[], Backend], openapi_base: Callable[[], dict[str, Any]] | None = None,
               management: bool = False) -> Starlette:
    """The endpoints, served by `backend()`. `openapi_base()` is the document that GET /docs.json extends
    with these endpoints (BentoML's own, which documents only @bentoml.api methods); without it, /docs.json
    is not served here. `management`: the management API's routes exist (there is an admin key)."""
    routes = Routes(backend)

    async def openapi(request: Request) -> Response:
        # Matched before BentoML's own /docs.json (mounted apps come first in its router), so the Swagger UI
        # at / shows these endpoints too.
        spec = openapi_base()  # type: ignore[misc]
        spec.setdefault("info", {})["version"] = tuneserve.__version__
        cfg = routes.backend.config
        models = [m for m in routes.backend.models.describe() if m["version"]]
        served, versions = [m["name"] for m in models], sorted({m["version"] for m in models})
        spec.setdefault("paths", {}).update(openapi_paths(cfg, served, versions, management))
        schemes = security_schemes(cfg, management)
        if schemes:
            spec.setdefault("components", {}).setdefault("securitySchemes", {}).update(schemes)
        return JSONResponse(spec)

    endpoints = [
        Route("/classify", json_errors(routes.classify), methods=["POST"]),
        Route("/classify_batch", json_errors(routes.classify_batch), methods=["POST"]),
        Route("/model", json_errors(routes.model_info), methods=["GET"]),
        Route("/models", json_errors(routes.list_models), methods=["GET"]),
        Route("/models/{name}", json_errors(routes.one_model), methods=["GET"]),
        Route("/models/{name}/classify", json_errors(routes.classify), methods=["POST"]),
        Route("/models/{name}/classify_batch", json_errors(routes.classify_batch), methods=["POST"]),
    ]
    v2 = OipRoutes(routes)
    endpoints += [Route(path, json_errors(getattr(v2, handler)), methods=[method]) for path, method, handler in oip_paths()]
    if management:
        endpoints += [
            Route("/v2/repository/index", json_errors(routes.repository_index), methods=["POST"]),
            Route("/v2/repository/models/{name}/load", json_errors(routes.load), methods=["POST"]),
            Route("/v2/repository/models/{name}/unload", json_errors(routes.unload), methods=["POST"]),
            Route("/v2/repository/models/{name}/rollback", json_errors(routes.rollback), methods=["POST"]),
        ]
    if openapi_base is not None:
        endpoints.append(Route("/docs.json", openapi, methods=["GET"]))
    return Starlette(routes=endpoints, exception_handlers={StarletteHTTPException: _http_exception})


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (405 for a wrong method, ...) in the service's JSON shape."""
    assert isinstance(exc, StarletteHTTPException)
    allowed = f"; allowed: {exc.headers['Allow']}" if exc.headers and "Allow" in exc.headers else ""
    return JSONResponse({"error": f"{exc.detail} for {request.method} {request.url.path}{allowed}"},
                        status_code=exc.status_code, headers=exc.headers)


# Liveness and readiness, under our names and the Open Inference Protocol's.
_PROBES = {"/livez": "live", "/readyz": "ready", "/v2/health/live": "live", "/v2/health/ready": "ready"}


class Probes:
    """ASGI middleware answering GET /livez and /readyz from `health()` (service/health.py) before BentoML's
    own probes, which say nothing about the other workers. /readyz is reached only once this worker's model
    is loaded (BentoML serves nothing before)."""

    def __init__(self, app, health: Callable[[], dict[str, Any]], model: Callable[[], str]):
        self.app, self.health, self.model = app, health, model

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] not in _PROBES:
            await self.app(scope, receive, send)
            return
        report = self.health()
        if _PROBES[scope["path"]] == "ready":
            response = JSONResponse({"status": "ready", "model": self.model(), **report})
        elif report["live"]:
            response = JSONResponse({"status": "live", **report})
        else:
            w = report["workers"]
            response = JSONResponse({"error": f"{w['expected'] - w['alive']} worker process(es) have been missing "
                                              f"for {w['missing_for_s']} s and were not restarted", **report},
                                    status_code=503)
        await response(scope, receive, send)


class JsonErrors:
    """ASGI middleware: an error answer that is not JSON (BentoML's 404 for an unknown path, a framework's
    plain-text error) becomes `{"error": "<its text>"}` with the same status and headers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}

        async def send_json_errors(message) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if message["status"] >= 400 and not headers.get(b"content-type", b"").startswith(b"application/json"):
                    held["start"], held["body"] = message, b""
                    return
            elif "start" in held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                start = held.pop("start")
                text = held["body"].decode("utf-8", "replace").strip() or f"HTTP {start['status']}"
                path = scope.get("extensions", {}).get(ORIGINAL_PATH, scope["path"])
                body = json.dumps({"error": f"{text}: {scope['method']} {path}"}).encode()
                headers = [(k, v) for k, v in start.get("headers", []) if k not in (b"content-type", b"content-length")]
                await send({**start, "headers": [*headers, (b"content-type", b"application/json"),
                                                 (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, send_json_errors)
