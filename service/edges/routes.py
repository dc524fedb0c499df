"""The HTTP edge: a small Starlette app, made by `create_app(engine)`, that the BentoML service mounts.

Each handler parses its request (read_body, read_form, parse_top_k below), makes one engine call, and encodes the answer; the routes are
the table's (route_table.py). Why not plain `@bentoml.api` endpoints: /classify must take the image as the raw
request body as well as a multipart upload, and BentoML parses the body itself (as JSON unless it is
multipart) before an API function runs, answering bad input with its own error shapes. Here every byte is
ours: bodies are size-checked while they stream in, and each failure is a 4xx `{"error": "..."}` that says what
to send instead. BentoML still provides the server, workers, /metrics and tracing.

`create_app` takes a function that returns the engine, called once, at the first request: in a BentoML worker
the engine is made when the service instance is, after the app.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute

import numpy as np

import tuneserve
from tuneserve.models.explain import DEFAULT_MAX_SIDE, normalise_heatmap, overlay_png
from tuneserve.models.preprocessing import Preprocessing, load_image
from tuneserve.service.edges.openapi import openapi_paths, security_schemes
from tuneserve.service.edges.route_table import RouteTable
from tuneserve.service.engine.engine import Classification, Engine, ImageInput
from tuneserve.service.engine.errors import RequestError, too_large

log = logging.getLogger("tuneserve.service")

Handler = Callable[[Request], Awaitable[Response]]


# -- reading a request: image bytes and options, a 4xx RequestError for every way it can be wrong -------------
# No model here: only Starlette's request and its multipart parser, so the limits (bytes per image, images per
# request, fields per form) are enforced before anything is decoded.

# Multipart framing (boundaries, part headers) on top of the images themselves.
MULTIPART_OVERHEAD_PER_PART = 16 * 1024
MAX_TEXT_FIELDS = 16  # top_k and a few client extras; more is a malformed or hostile form


async def read_body(request: Request, limit: int, setting: str, timeout_s: float) -> bytes:
    """The whole body, refusing (413) as soon as it is known to exceed `limit`, without reading the rest, and
    (408) when it has not all arrived within `timeout_s`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large("the request body", declared, limit, setting)

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():  # also covers chunked uploads, which declare no length
            size += len(chunk)
            if size > limit:
                raise too_large("the request body", f"more than {limit}", limit, setting)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        # The HTTP protocol closes a connection answered 408 at once, without reading the rest of the body.
        raise RequestError(408, f"the request body did not arrive within {timeout_s:g} s (server setting "
                             "TUNESERVE_BODY_TIMEOUT_S); send it faster, or in smaller requests",
                        {"Connection": "close"}) from None


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def read_form(
    request: Request, body: bytes, max_files: int, too_many: RequestError
) -> tuple[list[ImageInput], dict[str, str]]:
    """Parse an already size-checked multipart body: (file parts in order, text fields).
    More than `max_files` file parts raises `too_many`."""

    async def replay() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, replay(), max_files=max_files, max_fields=MAX_TEXT_FIELDS)
    parser.spool_max_size = len(body) + 1  # the body is in memory already: keep the parts there too
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if "too many files" in str(e).lower():
            raise too_many from None
        raise RequestError(400, f"malformed multipart/form-data request: {e}") from None
    files: list[ImageInput] = []
    fields: dict[str, str] = {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append(ImageInput(value.filename or key, await value.read()))
            else:
                fields[key] = value
    finally:
        await form.close()
    return files, fields


def parse_top_k(raw: str | None, default: int, num_classes: int) -> int:
    """top_k from a query parameter or form field: an integer >= 1; above the number of classes it is
    clamped to that number (asking for "all of them" with a big k is legitimate, not an error)."""
    if raw is None or raw.strip() == "":
        return min(default, num_classes)
    try:
        k = int(raw.strip())
    except ValueError:
        raise RequestError(400, f"top_k={raw!r} is not an integer; send an integer >= 1 (default {default})") from None
    if k < 1:
        raise RequestError(400, f"top_k={k} is out of range; send an integer >= 1 (the model has {num_classes} classes)")
    return min(k, num_classes)


# -- the routes ------------------------------------------------------------------------------------------------


def json_errors(handler: Handler) -> Handler:
    """RequestError -> its 4xx/503 JSON answer; anything else -> a logged 500 that still speaks JSON."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except RequestError as e:
            if e.answer_at is not None:  # a refusal, paced: answered at its time (engine/admission.py)
                await asyncio.sleep(max(0.0, e.answer_at - time.monotonic()))
            return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return JSONResponse({"error": "internal server error; the server log has the details"}, status_code=500)

    return wrapper


def predictions(result: Classification, k: int) -> dict[str, Any]:
    """/classify's answer for a one-image Classification."""
    return {"model": result.model.tag, "predictions": result.top(result.results[0], k)}


def explanation(result: Classification, image: ImageInput, k: int, pp: Preprocessing, max_pixels: int,
                as_png: bool) -> dict[str, Any] | bytes:
    """/explain's answer for a one-image Classification made with explain=True: the top-k, each with its
    heatmap (the model's h x w grid, min-max normalised to [0, 1]) and its overlay on the photo as sent (PNG,
    base64); `as_png`: the best class's overlay PNG alone."""
    probs, cams = result.results[0], result.cams[0]
    photo = load_image(image.data, max_pixels=max_pixels, draft_size=DEFAULT_MAX_SIDE)  # drawn at <= 1024 px
    best = np.argsort(-probs, kind="stable")[:min(k, probs.shape[-1])]
    if as_png:
        return overlay_png(photo, cams[best[0]], pp)
    return {"model": result.model.tag, "grid": list(cams.shape[1:]), "predictions": [
        {"label": result.model.labels[i], "score": float(probs[i]),
         "heatmap": np.round(normalise_heatmap(cams[i]), 4).tolist(),
         "overlay_png": base64.b64encode(overlay_png(photo, cams[i], pp)).decode("ascii")} for i in best]}


def batch_results(result: Classification, images: list[ImageInput], k: int) -> dict[str, Any]:
    """/classify_batch's answer: one result per image, in order; an image that failed has its error and status."""
    out: list[dict[str, Any]] = []
    for image, r in zip(images, result.results):
        if isinstance(r, RequestError):
            out.append({"filename": image.name, "error": r.message, "status": r.status})
        else:
            out.append({"filename": image.name, "predictions": result.top(r, k)})
    return {"model": result.model.tag, "results": out}


class Handlers:
    """tuneserve's REST routes, on the engine that `resolve()` returns."""

    def __init__(self, resolve: Callable[[], Engine]):
        self._resolve = resolve

    @functools.cached_property
    def engine(self) -> Engine:
        return self._resolve()

    def _top_k(self, raw: str | None, name: str | None) -> int:
        return parse_top_k(raw, self.engine.config.top_k, len(self.engine.model(name).labels))

    async def classify(self, request: Request) -> Response:
        arrived, name = time.monotonic(), request.path_params.get("name")  # the bound covers the body's reading too
        image, k = await self._one_image(request, name, "/classify")
        return JSONResponse(predictions(await self.engine.classify(name, [image], arrived=arrived), k))

    async def explain(self, request: Request) -> Response:
        """/classify's answer with, per predicted class, its heatmap on the model's grid and a PNG overlay on
        the photo as sent (base64); with `Accept: image/png`, the best class's overlay itself."""
        arrived, name = time.monotonic(), request.path_params.get("name")
        image, k = await self._one_image(request, name, "/explain")
        result = await self.engine.classify(name, [image], explain=True, arrived=arrived)
        as_png = "image/png" in request.headers.get("accept", "")
        pp, max_pixels = result.model.model.card.preprocessing, self.engine.config.max_pixels
        # Drawing decodes the photo again and blends a colour map over it: CPU work, off the event loop.
        body = await asyncio.to_thread(explanation, result, image, 1 if as_png else k, pp, max_pixels, as_png)
        return Response(body, media_type="image/png") if as_png else JSONResponse(body)

    async def _one_image(self, request: Request, name: str | None, route: str) -> tuple[ImageInput, int]:
        """The one image of a /classify-like request (raw body or multipart field) and its top_k."""
        cfg = self.engine.config
        k = self._top_k(request.query_params.get("top_k"), name)  # a bad top_k or model: before the body is read
        if is_multipart(request):
            body = await read_body(request, cfg.max_image_bytes + MULTIPART_OVERHEAD_PER_PART,
                                   "TUNESERVE_MAX_IMAGE_BYTES", cfg.body_timeout_s)
            files, fields = await read_form(request, body, 1, RequestError(
                400, f"{route} takes one image; send several to /classify_batch (one file part each)"))
            if not files:
                raise RequestError(400, "no file in the multipart form: send the image in a file field named 'image' "
                                        f"(e.g. curl -F image=@photo.jpg); text fields received: {sorted(fields) or 'none'}")
            if "top_k" in fields:
                k = self._top_k(fields["top_k"], name)
            return files[0], k
        # Anything that is not multipart is the image itself, whatever Content-Type says (curl's --data-binary
        # sends application/x-www-form-urlencoded): the decoder recognises the format.
        return ImageInput("body", await read_body(request, cfg.max_image_bytes, "TUNESERVE_MAX_IMAGE_BYTES",
                                                  cfg.body_timeout_s)), k

    async def classify_batch(self, request: Request) -> Response:
        arrived, cfg, name = time.monotonic(), self.engine.config, request.path_params.get("name")
        k = self._top_k(request.query_params.get("top_k"), name)
        if not is_multipart(request):
            raise RequestError(415, "/classify_batch takes multipart/form-data with one file part per image "
                                    "(e.g. curl -F images=@a.jpg -F images=@b.jpg); for one raw image use /classify")
        body = await read_body(request, cfg.max_request_bytes, "TUNESERVE_MAX_REQUEST_BYTES", cfg.body_timeout_s)
        files, fields = await read_form(request, body, cfg.max_batch_images, RequestError(
            413, f"too many images in one request: the limit is {cfg.max_batch_images} (server setting "
                 "TUNESERVE_MAX_BATCH_IMAGES); split them over several requests"))
        if not files:
            raise RequestError(400, "no file in the multipart form: send each image as a file part, e.g. "
                                    f"curl -F images=@a.jpg -F images=@b.jpg; text fields received: {sorted(fields) or 'none'}")
        if "top_k" in fields:
            k = self._top_k(fields["top_k"], name)
        result = await self.engine.classify(name, files, per_image_errors=True, arrived=arrived)
        return JSONResponse(batch_results(result, files, k))

    async def model_info(self, request: Request) -> Response:
        return JSONResponse(self.engine.model(None).describe())

    async def list_models(self, request: Request) -> Response:
        versions = self.engine.versions
        return JSONResponse({"default": versions.default, "models": versions.describe()})

    async def one_model(self, request: Request) -> Response:
        return JSONResponse(self.engine.versions.describe_one(request.path_params["name"]))

    # -- the management API (explicit model control; only with an admin key) -----------------------------------

    async def repository_index(self, request: Request) -> Response:
        """Triton's repository index: every model this worker knows, with its version and state."""
        return JSONResponse([{"name": m["name"], "version": m["version"] or "", "state": m["state"].upper(),
                              "reason": m["error"] or ""} for m in self.engine.versions.describe()])

    async def load(self, request: Request) -> Response:
        """Load `name` at the version in the body ({"version": "..."}; none: its newest) on every worker."""
        name = request.path_params["name"]
        self._explicit()
        version = (await _json_body(request)).get("version")
        if version is not None and not isinstance(version, str):
            raise RequestError(400, f"version must be a string, got {version!r}")
        from tuneserve.models.store import ModelNotFoundError, load_model

        try:  # one concrete version for every worker, even when the store changes meanwhile
            stored = await asyncio.to_thread(load_model, f"{name}:{version}" if version else name)
        except ModelNotFoundError as e:
            raise RequestError(404, str(e)) from None
        return JSONResponse(await self._change(name, {"version": stored.version}))

    async def unload(self, request: Request) -> Response:
        name = request.path_params["name"]
        self._explicit()
        self.engine.model(name)  # 404 for a model not served
        return JSONResponse(await self._change(name, {"unloaded": True}))

    async def rollback(self, request: Request) -> Response:
        name = request.path_params["name"]
        self._explicit()
        return JSONResponse(await self._change(name, {"version": self.engine.versions.previous_version(name)}))

    def _explicit(self) -> None:
        mode = self.engine.config.model_control
        if mode != "explicit":
            raise RequestError(409, f"model control is {mode!r}: versions change through the management API only "
                                    "with TUNESERVE_MODEL_CONTROL=explicit")

    async def _change(self, name: str, want: dict[str, Any]) -> dict[str, Any]:
        from tuneserve.service.engine.versions import ModelLoadFailed

        try:
            return await self.engine.versions.change(name, want)
        except ModelLoadFailed as e:
            raise RequestError(422, f"{e}; the version before keeps serving") from None


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await read_body(request, 64 * 1024, "the management API's body limit (64 KiB)", 10)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise RequestError(400, "the body must be JSON, e.g. {\"version\": \"abc123\"}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object, e.g. {\"version\": \"abc123\"}")
    return {**body.get("parameters", {}), **body} if isinstance(body.get("parameters"), dict) else body


def create_app(engine: Callable[[], Engine], openapi_base: Callable[[], dict[str, Any]] | None = None,
               management: bool = False) -> Starlette:
    """The table's routes (route_table.py), served by `engine()`. `openapi_base()` is the document that GET
    /docs.json extends with these routes (BentoML's own, which documents only @bentoml.api methods); without it,
    /docs.json is not served here. `management`: the management API's routes exist (there is an admin key)."""
    from tuneserve.service.edges.oip_routes import OipHandlers  # it reads bodies with read_body from here

    rest, table = Handlers(engine), RouteTable(management=management)
    v2 = OipHandlers(engine)

    async def openapi(request: Request) -> Response:
        # Matched before BentoML's own /docs.json (mounted apps come first in its router), so the Swagger UI
        # at / shows these routes too.
        spec = openapi_base()  # type: ignore[misc]
        spec.setdefault("info", {})["version"] = tuneserve.__version__
        cfg = rest.engine.config
        models = [m for m in rest.engine.versions.describe() if m["version"]]
        served, versions = [m["name"] for m in models], sorted({m["version"] for m in models})
        spec.setdefault("paths", {}).update(openapi_paths(cfg, served, versions, table))
        schemes = security_schemes(cfg, management)
        if schemes:
            spec.setdefault("components", {}).setdefault("securitySchemes", {}).update(schemes)
        return JSONResponse(spec)

    def handler(name: str) -> Handler:
        if name == "openapi":
            return openapi
        return getattr(rest, name, None) or getattr(v2, name)

    endpoints = [StarletteRoute(r.path, json_errors(handler(r.handler)), methods=[r.method]) for r in table.handled()
                 if r.handler != "openapi" or openapi_base is not None]
    return Starlette(routes=endpoints, exception_handlers={StarletteHTTPException: _http_exception})


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (405 for a wrong method, ...) in the service's JSON shape."""
    assert isinstance(exc, StarletteHTTPException)
    allowed = f"; allowed: {exc.headers['Allow']}" if exc.headers and "Allow" in exc.headers else ""
    return JSONResponse({"error": f"{exc.detail} for {request.method} {request.url.path}{allowed}"},
                        status_code=exc.status_code, headers=exc.headers)
