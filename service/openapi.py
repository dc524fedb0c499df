"""OpenAPI descriptions of the routes in service/routes.py, with the limits and defaults of the settings in
force, so that the document states what this server accepts (and fuzzers such as schemathesis generate
nothing it would refuse for reasons the schema could express)."""
from __future__ import annotations

from typing import Any

from tuneserve.service.config import ServiceConfig

_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_PREDICTIONS = {"type": "array", "items": {"type": "object", "required": ["label", "score"], "properties": {
    "label": {"type": "string"}, "score": {"type": "number", "description": "softmax probability"}}}}
_WHY = {
    400: "bad input: empty, not an image, truncated or corrupt, a bad top_k, a malformed form or HTTP framing",
    408: "the request's headers or body did not arrive in time",
    413: "an image or request over a byte, pixel, decode-memory or image-count limit",
    414: "the request line is too long",
    415: "an image format that is not served, or a batch that is not multipart",
    431: "the request headers are too large or too many",
    503: "overloaded: not answerable within the latency bound; retry after the Retry-After header",
}
_CLIENT_ERRORS = (400, 408, 413, 414, 415, 431, 503)


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": _WHY[c], "content": {"application/json": {"schema": _ERROR}}} for c in codes}


def openapi_paths(cfg: ServiceConfig) -> dict[str, Any]:
    top_k = {"type": "integer", "minimum": 1, "default": cfg.top_k}
    top_k_query = {"name": "top_k", "in": "query", "required": False, "schema": top_k,
                   "description": f"predictions per image (default {cfg.top_k}; more than the classes is clamped)"}
    # The byte limit is in the descriptions, not a maxLength: a binary string's length is not something
    # schema tools measure consistently, and the server's answer to an oversized image is its own (413).
    image = {"type": "string", "format": "binary", "minLength": 1}
    return {
        "/classify": {"post": {
            "tags": ["Service APIs"], "operationId": "tuneserve__classify",
            "description": "Classify one image (JPEG, PNG, WebP, GIF, BMP, TIFF), sent as the raw request body "
                           "or as the multipart file field `image` (multipart may also carry a `top_k` field). "
                           f"At most {cfg.max_image_bytes} bytes and {cfg.max_pixels} pixels.",
            "parameters": [top_k_query],
            "requestBody": {"required": True, "content": {
                "image/*": {"schema": image},
                "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                    "image": image, "top_k": top_k}}},
            }},
            "responses": {"200": {"description": "top-k predictions, best first", "content": {"application/json": {
                "schema": {"type": "object", "required": ["model", "predictions"], "properties": {
                    "model": {"type": "string"}, "predictions": _PREDICTIONS}}}}},
                **_errors(*_CLIENT_ERRORS)},
        }},
        "/classify_batch": {"post": {
            "tags": ["Service APIs"], "operationId": "tuneserve__classify_batch",
            "description": "Classify several images in one multipart request (one file part per image, e.g. field "
                           "`images` repeated). Answers one result per image, in order; an image that cannot be "
                           "decoded gets its own `error` and `status` while the others are classified. At most "
                           f"{cfg.max_batch_images} images and {cfg.max_request_bytes} bytes in all.",
            "parameters": [top_k_query],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["images"], "properties": {
                    # Items unconstrained: an empty or oversized image is answered in-band, as that item's error.
                    "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                               "maxItems": cfg.max_batch_images},
                    "top_k": top_k}}}}},
            "responses": {"200": {"description": "one result per image, in request order", "content": {
                "application/json": {"schema": {"type": "object", "required": ["model", "results"], "properties": {
                    "model": {"type": "string"}, "results": {"type": "array", "items": {"type": "object", "properties": {
                        "filename": {"type": "string"}, "predictions": _PREDICTIONS,
                        "error": {"type": "string"}, "status": {"type": "integer"}}}}}}}}},
                **_errors(*_CLIENT_ERRORS)},
        }},
        "/model": {"get": {
            "tags": ["Service APIs"], "operationId": "tuneserve__model",
            "description": "The served model: tag, architecture, labels, input size, preprocessing, validation "
                           "metrics, ONNX parity report, onnxruntime provider, batching settings and request limits.",
            "responses": {"200": {"description": "model card", "content": {"application/json": {
                "schema": {"type": "object"}}}}},
        }},
    }
