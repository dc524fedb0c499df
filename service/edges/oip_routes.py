"""The Open Inference Protocol's routes (KServe v2 REST, as Triton serves it), on the same engine as /classify:
the same batcher, preprocessing, admission, limits, API keys and metrics; only the wire format differs
(oip.py). /v2/health/live and /v2/health/ready are answered by the front middleware with the same report as
/livez and /readyz (front.py).
"""
from __future__ import annotations

import asyncio
import functools
import time
from typing import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import tuneserve
from tuneserve.service.edges import oip
from tuneserve.service.edges.routes import read_body
from tuneserve.service.engine.engine import Engine
from tuneserve.service.engine.errors import RequestError
from tuneserve.service.engine.model_version import ModelVersion


class OipHandlers:
    """GET /v2, /v2/models/{name}[/versions/{version}][/ready|/config]; POST .../infer, on the engine that
    `resolve()` returns."""

    def __init__(self, resolve: Callable[[], Engine]):
        self._resolve = resolve

    @functools.cached_property
    def engine(self) -> Engine:
        return self._resolve()

    def _served(self, request: Request) -> ModelVersion:
        """The served version the path names; 404 for another model or version."""
        return self.engine.model(request.path_params["name"], request.path_params.get("version"))

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "tuneserve", "version": tuneserve.__version__, "extensions": oip.EXTENSIONS})

    async def model_metadata(self, request: Request) -> Response:
        model = self._served(request)
        return JSONResponse(oip.model_metadata(model.name, [model.version], oip.pixels_spec(model), len(model.labels),
                                               model.cam_grid))

    async def model_ready(self, request: Request) -> Response:
        model = self._served(request)  # a model that is not served is a 404, as the protocol asks
        return JSONResponse({"name": model.name, "version": model.version, "ready": True})

    async def model_config(self, request: Request) -> Response:
        model = self._served(request)
        return JSONResponse(oip.model_config(model.name, model.version, oip.pixels_spec(model), len(model.labels),
                                             self.engine.config.max_batch_images))

    async def infer(self, request: Request) -> Response:
        arrived = time.monotonic()  # the bound covers reading and parsing the body too
        model, cfg = self._served(request), self.engine.config
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise RequestError(415, f"Content-Encoding {encoding!r} is not accepted: send the request uncompressed "
                                    "(images are compressed already)")
        body = await read_body(request, cfg.max_request_bytes, "TUNESERVE_MAX_REQUEST_BYTES", cfg.body_timeout_s)
        # The JSON form of a batch of images is base64 text (4/3 of the bytes) inside JSON: parsing it is
        # the request's own CPU, so it runs off the event loop when it is large.
        parse = functools.partial(oip.parse_infer_request, body, request.headers.get(oip.HEADER_LENGTH),
                                  oip.pixels_spec(model), cfg.max_batch_images, cfg.max_image_bytes)
        parsed = await asyncio.to_thread(parse) if len(body) > 256 * 1024 else parse()
        probs, cams = await oip.infer(self.engine, model, parsed, arrived)
        content, headers = oip.encode_infer_response(model.name, model.version, parsed, probs, model.labels, cams)
        return Response(content, headers=headers)
