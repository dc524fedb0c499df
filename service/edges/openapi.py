"""OpenAPI descriptions of the routes in the route table (route_table.py), with the limits and defaults of the
settings in force, so that the document states what this server accepts (and fuzzers such as schemathesis
generate nothing it would refuse for reasons the schema could express). Which paths are documented comes from
the table; a route our handlers answer that has no description here is an error (tests/test_service_http.py)."""
from __future__ import annotations

from typing import Any

from tuneserve.service.config import ServiceConfig
from tuneserve.service.edges.route_table import RouteTable

_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_PREDICTIONS = {"type": "array", "items": {"type": "object", "required": ["label", "score"], "properties": {
    "label": {"type": "string"}, "score": {"type": "number", "description": "softmax probability"}}}}
_WHY = {
    400: "bad input: empty, not an image, truncated or corrupt, a bad top_k, a malformed form or HTTP framing",
    401: "an API key is required: no 'Authorization: Bearer <key>' header, or a wrong key",
    404: "no such model is served (the message lists the served ones)",
    408: "the request's headers or body did not arrive in time",
    409: "a change this server does not allow: not in explicit model control, the default model, nothing to roll back to",
    413: "an image or request over a byte, pixel, decode-memory or image-count limit",
    414: "the request line is too long",
    415: "an image format that is not served, or a batch that is not multipart",
    422: "the version failed to load or warm up (the version before keeps serving); or, for explain, a model "
         "exported before class activation maps",
    431: "the request headers are too large or too many",
    503: "overloaded: not answerable within the latency bound; retry after the Retry-After header",
}
_CLIENT_ERRORS = (400, 408, 413, 414, 415, 431, 503)


def _name(served: list[str] | None) -> dict[str, Any]:
    """The {name} path parameter: one of the names served now, or (None) any valid model name."""
    from tuneserve.models.store import NAME_PATTERN

    schema = {"type": "string", "enum": served} if served is not None else {"type": "string", "pattern": NAME_PATTERN}
    return {"name": "name", "in": "path", "required": True, "schema": schema,
            "description": "a served model's name (GET /models lists them)" if served is not None
            else "a model name in the store"}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": _WHY[c], "content": {"application/json": {"schema": _ERROR}}} for c in codes}


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def openapi_paths(cfg: ServiceConfig, served: list[str], versions: list[str], table: RouteTable) -> dict[str, Any]:
    """The table's routes (those with a description: ours, and BentoML's client routes) with the limits of `cfg`
    and the model names `served` now, at `versions`; with an API key (or an admin key for the management API)
    the routes that need it say so, and may answer 401. KeyError for a route of ours without a description."""
    described = _described(cfg, served, versions, any(r.management for r in table.routes))
    paths: dict[str, Any] = {}
    for route in table.routes:
        op = described.get(route.path, {}).get(route.method.lower())
        if op is None:
            if route.documented:
                raise KeyError(f"{route.method} {route.path} has no OpenAPI description in service/edges/openapi.py")
            continue
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return paths


def _described(cfg: ServiceConfig, served: list[str], versions: list[str], management: bool) -> dict[str, Any]:
    api_key = cfg.key("api") is not None
    classify, batch, info = _classify(cfg), _classify_batch(cfg), _model_info()
    name = _name(served)
    paths: dict[str, Any] = {
        "/classify": {"post": classify("tuneserve__classify", "the default model")},
        "/classify_batch": {"post": batch("tuneserve__classify_batch", "the default model")},
        "/model": {"get": info("tuneserve__model", "The default model")},
        "/models": {"get": {
            "tags": ["Models"], "operationId": "tuneserve__models",
            "description": "Every served model: name, version, state (ready, loading, failed with its error, "
                           "unloaded), whether it is the default, number of labels, validation metrics.",
            "responses": {"200": _json("the served models", {"type": "object", "required": ["default", "models"],
                                                             "properties": {"default": {"type": "string"},
                                                                            "models": {"type": "array",
                                                                                       "items": {"type": "object"}}}})}}},
        "/models/{name}": {"get": {**info("tuneserve__models_name", "Model `name`"), "parameters": [name],
                                   "responses": {**info("", "")["responses"], **_errors(404)}}},
        "/models/{name}/classify": {"post": classify("tuneserve__models_name_classify", "model `name`", name)},
        "/models/{name}/classify_batch": {"post": batch("tuneserve__models_name_classify_batch", "model `name`",
                                                        name)},
        "/explain": {"post": _explain(classify("tuneserve__explain", "the default model"))},
        "/models/{name}/explain": {"post": _explain(classify("tuneserve__models_name_explain", "model `name`", name))},
        # The routes BentoML's clients call (service/service.py's @bentoml.api functions), answered by /classify
        # and /classify_batch (the front maps them: route_table.CLIENT_ROUTES): the same operations.
        "/bentoml/classify": {"post": classify("classify", "the default model (BentoML's clients)")},
        "/bentoml/classify_batch": {"post": batch("classify_batch", "the default model (BentoML's clients)")},
    }
    if api_key:
        for item in paths.values():
            for op in item.values():
                op["security"] = [{"apiKey": []}]
                op["responses"].update(_errors(401))
    paths.update(_oip(cfg, served, versions, api_key))
    if management:
        paths.update(_management(served))
    return paths


def _oip(cfg: ServiceConfig, served: list[str], versions: list[str], api_key: bool) -> dict[str, Any]:
    """The Open Inference Protocol's routes (oip_routes.py; the tensors are described in oip.py)."""
    from tuneserve.service.edges.route_table import ROUTES

    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "enum": versions},
               "description": "the version served now (GET /v2/models/{name} lists it)"}
    docs = {
        "server_metadata": ("Server metadata: name, version and the protocol extensions served.", None),
        "model_metadata": ("Model metadata: versions, platform, input and output tensors.", None),
        "model_ready": ("200 when the model (at the version) is served and ready; 404 when it is not served.", None),
        "model_config": ("The model's configuration, as Triton's model configuration extension answers it.", None),
        "infer": ("Classify images with the Open Inference Protocol (KServe v2): input `image` (BYTES [N], encoded "
                  "images; base64 text in JSON, raw in the binary tensor data extension with an "
                  "Inference-Header-Content-Length header) or `pixels` (resized and cropped: UINT8 [N,S,S,3] RGB, or "
                  "FP32 [N,3,S,S] normalised for models exported before pixel input; GET /v2/models/{name} says "
                  "which); output "
                  "`probabilities` (FP32 [N,classes]), or with `parameters.classification: k` BYTES [N,k] of "
                  f"'score:index:label'. At most {cfg.max_batch_images} images, {cfg.max_image_bytes} bytes each, "
                  f"{cfg.max_request_bytes} bytes in all.", 
                  {"required": True, "content": {
                      "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
                          "id": {"type": "string"}, "parameters": {"type": "object"},
                          "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                              "type": "object", "required": ["name", "datatype", "shape"], "properties": {
                                  "name": {"type": "string", "enum": ["image", "pixels"]},
                                  "datatype": {"type": "string", "enum": ["BYTES", "UINT8", "FP32"]},
                                  "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                                  "parameters": {"type": "object"}, "data": {"type": "array"}}}},
                          "outputs": {"type": "array", "maxItems": 1, "items": {"type": "object"}}}}},
                      "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}),
    }
    paths: dict[str, Any] = {}
    for path, method, handler in ((r.path, r.method, r.handler) for r in ROUTES if r.handler in docs):
        description, body = docs[handler]
        params = ([_name(served)] if "{name}" in path else []) + ([version] if "{version}" in path else [])
        errors = (400, 404, 408, 413, 415, 503) if handler == "infer" else ((404,) if params else ())
        op: dict[str, Any] = {"tags": ["Open Inference Protocol"], "description": description,
                              "operationId": "tuneserve__v2_" + handler + ("_version" if "{version}" in path else ""),
                              "parameters": params, "responses": {"200": _json("the answer"), **_errors(*errors)}}
        if body is not None:
            op["requestBody"] = body
        if api_key:
            op["security"] = [{"apiKey": []}]
            op["responses"].update(_errors(401))
        paths[path] = {method.lower(): op}
    return paths


def security_schemes(cfg: ServiceConfig, management: bool) -> dict[str, Any]:
    """The bearer schemes the document's operations refer to."""
    schemes = {}
    if cfg.key("api") is not None:
        schemes["apiKey"] = {"type": "http", "scheme": "bearer", "description": "TUNESERVE_API_KEY"}
    if management:
        schemes["adminKey"] = {"type": "http", "scheme": "bearer", "description": "TUNESERVE_ADMIN_KEY"}
    return schemes


def _classify(cfg: ServiceConfig):
    top_k = {"type": "integer", "minimum": 1, "default": cfg.top_k}
    top_k_query = {"name": "top_k", "in": "query", "required": False, "schema": top_k,
                   "description": f"predictions per image (default {cfg.top_k}; more than the classes is clamped)"}
    # The byte limit is in the descriptions, not a maxLength: a binary string's length is not something
    # schema tools measure consistently, and the server's answer to an oversized image is its own (413).
    image = {"type": "string", "format": "binary", "minLength": 1}

    def operation(operation_id: str, which: str, *path_params: dict[str, Any]) -> dict[str, Any]:
        return {
            "tags": ["Service APIs"], "operationId": operation_id,
            "description": f"Classify one image with {which} (JPEG, PNG, WebP, GIF, BMP, TIFF), sent as the raw "
                           "request body or as the multipart file field `image` (multipart may also carry a "
                           f"`top_k` field). At most {cfg.max_image_bytes} bytes and {cfg.max_pixels} pixels.",
            "parameters": [*path_params, top_k_query],
            "requestBody": {"required": True, "content": {
                "image/*": {"schema": image},
                "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                    "image": image, "top_k": top_k}}},
            }},
            "responses": {"200": _json("top-k predictions, best first", {
                "type": "object", "required": ["model", "predictions"], "properties": {
                    "model": {"type": "string"}, "predictions": _PREDICTIONS}}),
                **_errors(*_CLIENT_ERRORS, *((404,) if path_params else ()))},
        }
    return operation


def _classify_batch(cfg: ServiceConfig):
    top_k = {"type": "integer", "minimum": 1, "default": cfg.top_k}
    top_k_query = {"name": "top_k", "in": "query", "required": False, "schema": top_k,
                   "description": f"predictions per image (default {cfg.top_k}; more than the classes is clamped)"}

    def operation(operation_id: str, which: str, *path_params: dict[str, Any]) -> dict[str, Any]:
        return {
            "tags": ["Service APIs"], "operationId": operation_id,
            "description": f"Classify several images with {which} in one multipart request (one file part per "
                           "image, e.g. field `images` repeated). Answers one result per image, in order; an "
                           "image that cannot be decoded gets its own `error` and `status` while the others are "
                           f"classified. At most {cfg.max_batch_images} images and {cfg.max_request_bytes} bytes "
                           "in all.",
            "parameters": [*path_params, top_k_query],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["images"], "properties": {
                    # Items unconstrained: an empty or oversized image is answered in-band, as that item's error.
                    "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                               "maxItems": cfg.max_batch_images},
                    "top_k": top_k}}}}},
            "responses": {"200": _json("one result per image, in request order", {
                "type": "object", "required": ["model", "results"], "properties": {
                    "model": {"type": "string"}, "results": {"type": "array", "items": {"type": "object", "properties": {
                        "filename": {"type": "string"}, "predictions": _PREDICTIONS,
                        "error": {"type": "string"}, "status": {"type": "integer"}}}}}}),
                **_errors(*_CLIENT_ERRORS, *((404,) if path_params else ()))},
        }
    return operation


def _explain(op: dict[str, Any]) -> dict[str, Any]:
    """/classify's operation, answered with class activation maps (service/edges/routes.py, explanation)."""
    answer = {"type": "object", "required": ["model", "predictions"], "properties": {
        "model": {"type": "string"}, "grid": {"type": "array", "items": {"type": "integer"}},
        "predictions": {"type": "array", "items": {"type": "object", "required": ["label", "score", "heatmap"],
                                                   "properties": {
            "label": {"type": "string"}, "score": {"type": "number"},
            "heatmap": {"type": "array", "items": {"type": "array", "items": {"type": "number"}},
                        "description": "the class's activation on the model's grid, normalised to [0, 1]"},
            "overlay_png": {"type": "string", "description": "base64 PNG: the heatmap over the photo as sent"}}}}}}
    responses = {**op["responses"], "200": {"description": "top-k predictions with their class activation maps",
                                            "content": {"application/json": {"schema": answer},
                                                        "image/png": {"schema": {"type": "string", "format": "binary"}}}},
                 "422": {"description": _WHY[422], "content": {"application/json": {"schema": _ERROR}}}}
    description = (op["description"].replace("Classify one image", "Explain the classification of one image")
                   + " Answers the top-k, each with its class activation map (where the model looked) on the model's "
                   "grid and as a PNG overlay on the photo; with `Accept: image/png`, the best class's overlay itself. "
                   "Models exported before class activation maps answer 422.")
    return {**op, "operationId": op["operationId"], "description": description, "responses": responses}


def _model_info():
    def operation(operation_id: str, which: str) -> dict[str, Any]:
        return {"tags": ["Models"], "operationId": operation_id,
                "description": f"{which}: tag, architecture, labels, input size, preprocessing, validation metrics, "
                               "ONNX parity report, onnxruntime provider, batching settings and request limits.",
                "responses": {"200": _json("model card")}}
    return operation


def _management(served: list[str]) -> dict[str, Any]:
    version_body = {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"version": {"type": "string", "minLength": 1}}}}}}
    changed = _json("every worker serves the change", {"type": "object", "required": ["name", "workers"], "properties": {
        "name": {"type": "string"}, "version": {"type": ["string", "null"]}, "workers": {"type": "integer"}}})

    def operation(operation_id: str, description: str, body: bool = False, errors: tuple[int, ...] = ()) -> dict:
        # Load takes any name in the store (a model not served yet is added); the others, a served one.
        op = {"tags": ["Management"], "operationId": operation_id, "description": description,
              "security": [{"adminKey": []}], "parameters": [_name(None if body else served)],
              "responses": {"200": changed, **_errors(400, 401, 404, 409, *errors)}}
        if body:
            op["requestBody"] = version_body
        return op

    return {
        "/v2/repository/index": {"post": {
            "tags": ["Management"], "operationId": "tuneserve__repository_index", "security": [{"adminKey": []}],
            "description": "Every model this service knows, with its version and state (READY, LOADING, FAILED, "
                           "UNLOADED), as Triton's repository index answers.",
            "responses": {"200": _json("the models", {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "version": {"type": "string"}, "state": {"type": "string"},
                "reason": {"type": "string"}}}}), **_errors(401)}}},
        "/v2/repository/models/{name}/load": {"post": operation(
            "tuneserve__repository_load", "Load `name` at `version` (none: its newest in the store) on every worker, "
            "warm it up and switch to it; answers once every worker serves it. Explicit model control only.",
            body=True, errors=(422,))},
        "/v2/repository/models/{name}/unload": {"post": operation(
            "tuneserve__repository_unload", "Stop serving `name` on every worker (not the default model). Explicit "
            "model control only.")},
        "/v2/repository/models/{name}/rollback": {"post": operation(
            "tuneserve__repository_rollback", "Serve the version of `name` served before the current one, on every "
            "worker. Explicit model control only.", errors=(422,))},
    }
