"""The HTTP endpoints: a small Starlette app that service/service.py mounts into the BentoML service.

Why not plain `@bentoml.api` endpoints: /classify must take the image as the raw request body as well as a
multipart upload, and BentoML parses the body itself (as JSON unless it is multipart) before an API
function runs, answering bad input with its own error shapes. Here every byte is ours: bodies are
size-checked while they stream in, and each failure is a 4xx `{"error": "..."}` that says what to send
instead. BentoML still provides the server, workers, /livez, /readyz, /metrics and tracing; the handlers
call the service's preprocess and classify (which batches, service/batcher.py). The service instance comes from `bentoml.get_current_service()`.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Awaitable, Callable

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from models.runtime import top_k
from service.inputs import (
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


def _service() -> Any:
    import bentoml

    return bentoml.get_current_service()


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


def _admit_request(request: Request):
    """Common start of both classify routes: the service, its settings, the class count and the query's
    top_k. Capacity and a bad query-string top_k are refused before a possibly large body is read."""
    svc = _service()
    cfg = svc.config
    n_classes = len(svc.labels)
    svc.check_capacity()
    return svc, cfg, n_classes, parse_top_k(request.query_params.get("top_k"), cfg.top_k, n_classes)


@json_errors
async def classify(request: Request) -> Response:
    svc, cfg, n_classes, k = _admit_request(request)
    if is_multipart(request):
        body = await read_body(request, cfg.max_image_bytes + MULTIPART_OVERHEAD_PER_PART, "TUNESERVE_MAX_IMAGE_BYTES")
        files, fields = await read_form(request, body, 1, HTTPError(
            400, "/classify takes one image; send several to /classify_batch (one file part each)"))
        if not files:
            raise HTTPError(400, "no file in the multipart form: send the image in a file field named 'image' "
                                 f"(e.g. curl -F image=@photo.jpg); text fields received: {sorted(fields) or 'none'}")
        image = files[0]
        if "top_k" in fields:
            k = parse_top_k(fields["top_k"], cfg.top_k, n_classes)
    else:
        # Anything that is not multipart is the image itself, whatever Content-Type says (curl's
        # --data-binary sends application/x-www-form-urlencoded): the decoder recognises the format.
        image = ImageInput("body", await read_body(request, cfg.max_image_bytes, "TUNESERVE_MAX_IMAGE_BYTES"))
    _check_image_size(image, cfg.max_image_bytes)
    with svc.admit(1):
        array = await svc.preprocess(image.data)
        probs = await svc.classify([array])
    return JSONResponse({"model": svc.model.tag, "predictions": top_k(probs[0], svc.labels, k)})


@json_errors
async def classify_batch(request: Request) -> Response:
    svc, cfg, n_classes, k = _admit_request(request)
    if not is_multipart(request):
        raise HTTPError(415, "/classify_batch takes multipart/form-data with one file part per image "
                             "(e.g. curl -F images=@a.jpg -F images=@b.jpg); for one raw image use /classify")
    body = await read_body(request, cfg.max_request_bytes, "TUNESERVE_MAX_REQUEST_BYTES")
    files, fields = await read_form(request, body, cfg.max_batch_images, HTTPError(
        413, f"too many images in one request: the limit is {cfg.max_batch_images} (server setting "
             "TUNESERVE_MAX_BATCH_IMAGES); split them over several requests"))
    if not files:
        raise HTTPError(400, "no file in the multipart form: send each image as a file part, e.g. "
                             f"curl -F images=@a.jpg -F images=@b.jpg; text fields received: {sorted(fields) or 'none'}")
    if "top_k" in fields:
        k = parse_top_k(fields["top_k"], cfg.top_k, n_classes)

    async def prepare(image: ImageInput) -> np.ndarray | HTTPError:
        try:
            _check_image_size(image, cfg.max_image_bytes)
            return await svc.preprocess(image.data)
        except HTTPError as e:
            return e  # one bad image gets its own error; the others are still classified

    with svc.admit(len(files)):
        prepared = await asyncio.gather(*(prepare(f) for f in files))
        good = [p for p in prepared if isinstance(p, np.ndarray)]
        probs = iter(await svc.classify(good) if good else [])
    results: list[dict[str, Any]] = []
    for image, p in zip(files, prepared):
        if isinstance(p, HTTPError):
            results.append({"filename": image.name, "error": p.message, "status": p.status})
        else:
            results.append({"filename": image.name, "predictions": top_k(next(probs), svc.labels, k)})
    return JSONResponse({"model": svc.model.tag, "results": results})


@json_errors
async def model_info(request: Request) -> Response:
    return JSONResponse(_service().describe())


async def openapi(request: Request) -> Response:
    """BentoML's OpenAPI document plus these endpoints. It documents only @bentoml.api methods (and
    mounted FastAPI apps); this route is matched before BentoML's own /docs.json because mounted apps
    come first in its router, so the Swagger UI at / shows /classify too."""
    spec = request.app.state.bentoml_service.openapi_spec.asdict()
    spec.setdefault("paths", {}).update(OPENAPI_PATHS)
    return JSONResponse(spec)


app = Starlette(routes=[
    Route("/classify", classify, methods=["POST"]),
    Route("/classify_batch", classify_batch, methods=["POST"]),
    Route("/model", model_info, methods=["GET"]),
    Route("/docs.json", openapi, methods=["GET"]),
])


# -- OpenAPI descriptions of the endpoints above ----------------------------------------------------------

_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_PREDICTIONS = {"type": "array", "items": {"type": "object", "properties": {
    "label": {"type": "string"}, "score": {"type": "number", "description": "softmax probability"}}}}
_TOP_K = {"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1},
          "description": "predictions per image (default 5; larger than the number of classes is clamped)"}


def _errors(*codes: int) -> dict[str, Any]:
    why = {400: "bad input (empty, not an image, truncated, bad top_k, malformed form)",
           413: "image or request over the byte, pixel or image-count limit", 415: "unsupported image format",
           503: "overloaded: retry after the Retry-After header"}
    return {str(c): {"description": why[c], "content": {"application/json": {"schema": _ERROR}}} for c in codes}


OPENAPI_PATHS: dict[str, Any] = {
    "/classify": {"post": {
        "tags": ["Service APIs"], "operationId": "tuneserve__classify",
        "description": "Classify one image (JPEG, PNG, WebP, GIF, BMP, TIFF), sent as the raw request body or "
                       "as the multipart file field `image` (multipart may also carry a `top_k` field).",
        "parameters": [_TOP_K],
        "requestBody": {"required": True, "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "format": "binary"}, "top_k": {"type": "integer", "minimum": 1}}}},
        }},
        "responses": {"200": {"description": "top-k predictions, best first", "content": {"application/json": {
            "schema": {"type": "object", "properties": {"model": {"type": "string"}, "predictions": _PREDICTIONS}}}}},
            **_errors(400, 413, 415, 503)},
    }},
    "/classify_batch": {"post": {
        "tags": ["Service APIs"], "operationId": "tuneserve__classify_batch",
        "description": "Classify several images in one multipart request (one file part per image, e.g. field "
                       "`images` repeated). Answers one result per image, in order; an image that cannot be "
                       "decoded gets its own `error` and `status` while the others are classified.",
        "parameters": [_TOP_K],
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["images"], "properties": {
                "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                "top_k": {"type": "integer", "minimum": 1}}}}}},
        "responses": {"200": {"description": "one result per image, in request order", "content": {
            "application/json": {"schema": {"type": "object", "properties": {
                "model": {"type": "string"}, "results": {"type": "array", "items": {"type": "object", "properties": {
                    "filename": {"type": "string"}, "predictions": _PREDICTIONS,
                    "error": {"type": "string"}, "status": {"type": "integer"}}}}}}}}},
            **_errors(400, 413, 415, 503)},
    }},
    "/model": {"get": {
        "tags": ["Service APIs"], "operationId": "tuneserve__model",
        "description": "The served model: tag, architecture, labels, input size, preprocessing, validation metrics, "
                       "ONNX parity report, onnxruntime provider, batching settings and request limits.",
        "responses": {"200": {"description": "model card", "content": {"application/json": {"schema": {"type": "object"}}}}},
    }},
}
