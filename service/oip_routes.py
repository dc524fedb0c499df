"""The Open Inference Protocol's routes (KServe v2 REST, as Triton serves it), on the same backend as /classify:
the same batcher, preprocessing, admission, limits, API keys and metrics; only the wire format differs
(service/oip.py). /v2/health/live and /v2/health/ready are answered by the probes middleware with the same
report as /livez and /readyz (service/routes.py, Probes).
"""
from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import tuneserve
from tuneserve.service import oip
from tuneserve.service.http_protocol import admitted_from_headers
from tuneserve.service.inputs import HTTPError, read_body

if TYPE_CHECKING:
    from tuneserve.service.routes import ServedVersion


class OipRoutes:
    """GET /v2, /v2/models/{name}[/versions/{version}][/ready|/config]; POST .../infer."""

    def __init__(self, routes):
        self.routes = routes  # service/routes.Routes: the backend, admission and per-model metrics

    @property
    def backend(self):
        return self.routes.backend

    def _served(self, request: Request):
        """The served version the path names; 404 for another model or version."""
        model = self.backend.get(request.path_params["name"])
        version = request.path_params.get("version")
        if version is not None and version != model.version:
            raise HTTPError(404, f"model {model.name!r} version {version!r} is not served here; it serves version "
                                 f"{model.version!r}")
        return model

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "tuneserve", "version": tuneserve.__version__, "extensions": oip.EXTENSIONS})

    async def model_metadata(self, request: Request) -> Response:
        model = self._served(request)
        return JSONResponse(oip.model_metadata(model.name, [model.version], _pixels(model), len(model.labels)))

    async def model_ready(self, request: Request) -> Response:
        model = self._served(request)  # a model that is not served is a 404, as the protocol asks
        return JSONResponse({"name": model.name, "version": model.version, "ready": True})

    async def model_config(self, request: Request) -> Response:
        model = self._served(request)
        return JSONResponse(oip.model_config(model.name, model.version, _pixels(model), len(model.labels),
                                             self.backend.config.max_batch_images))

    async def infer(self, request: Request) -> Response:
        with self._served(request).in_use() as model, self.routes.measured(model):
            return await self._infer(request, model)

    async def _infer(self, request: Request, model) -> Response:
        b, cfg = self.backend, self.backend.config
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise HTTPError(415, f"Content-Encoding {encoding!r} is not accepted: send the request uncompressed "
                                 "(images are compressed already)")
        self.routes.admit_early(request)
        body = await read_body(request, cfg.max_request_bytes, "TUNESERVE_MAX_REQUEST_BYTES", cfg.body_timeout_s)
        # The JSON form of a batch of images is base64 text (4/3 of the bytes) inside JSON: parsing it is
        # the request's own CPU, so it runs off the event loop when it is large.
        parse = functools.partial(oip.parse_infer_request, body, request.headers.get(oip.HEADER_LENGTH),
                                  _pixels(model), cfg.max_batch_images, cfg.max_image_bytes)
        parsed = await asyncio.to_thread(parse) if len(body) > 256 * 1024 else parse()
        deadline = b.deadline()
        # Admission judged one image from the headers (service/http_protocol.py); more need a fresh estimate.
        with b.admit(parsed.count, estimate=parsed.count > 1 or not admitted_from_headers(request.scope)):
            if parsed.pixels is not None:
                arrays = list(parsed.pixels)  # already preprocessed: straight to the batcher
            else:
                arrays = await asyncio.gather(*(model.preprocess(data, deadline) for data in parsed.images))
            probs = await model.classify(arrays, deadline)
            if deadline.expired():
                raise b.late(deadline, "before the answer was ready")
        content, headers = oip.encode_infer_response(model.name, model.version, parsed, probs, model.labels)
        return Response(content, headers=headers)


def _pixels(model: ServedVersion) -> oip.PixelsSpec:
    """The `pixels` input `model` takes."""
    return oip.PixelsSpec.of(model.input_size, model.takes_pixels)


def oip_paths() -> list[tuple[str, str, str]]:
    """(path, method, OipRoutes handler name) of every v2 route but the health probes."""
    out: list[tuple[str, str, str]] = [("/v2", "GET", "server_metadata")]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        out += [(base, "GET", "model_metadata"), (f"{base}/ready", "GET", "model_ready"),
                (f"{base}/config", "GET", "model_config"), (f"{base}/infer", "POST", "infer")]
    return out

