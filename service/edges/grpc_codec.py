"""The Open Inference Protocol's gRPC binding (Triton's grpc_service.proto): its messages in and out.

Codec only, no model and no server, as oip.py is for REST: `parse_model_infer` turns a ModelInferRequest into
the same `oip.InferRequest` the REST parser makes, through the same checks and messages (oip.read_input,
oip.check_output); `model_infer_response` encodes the same output (oip.output_tensor) as raw_output_contents,
the binary form every gRPC client of the protocol reads. Where gRPC carries a tensor differently from REST, it
is said here: elements come in `raw_input_contents` (one entry per input: tritonclient's way) or in the
input's typed `contents` (bytes_contents for BYTES, uint_contents for UINT8, fp32_contents for FP32).

The HTTP statuses of RequestError map to gRPC status codes in GRPC_STATUS. A request that is too large
(413: too many images, an image over its limit) is INVALID_ARGUMENT, not RESOURCE_EXHAUSTED: it fails the
same way however often it is sent, and RESOURCE_EXHAUSTED is the code that clients' retry policies treat as
transient (quota, rate limit), so they would resend it; Triton answers a batch over max_batch_size with
INVALID_ARGUMENT too. A message over the size limit (TUNESERVE_MAX_REQUEST_BYTES) is refused by gRPC itself
before any of this runs, with its own RESOURCE_EXHAUSTED.
"""
from __future__ import annotations

from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from tuneserve.service.edges import oip
from tuneserve.service.edges.oip_proto import grpc_service_pb2 as pb
from tuneserve.service.edges.oip_proto import model_config_pb2
from tuneserve.service.engine.errors import RequestError

# Over gRPC every tensor is binary already, and the management API is REST's only.
EXTENSIONS = ["classification", "model_configuration"]

GRPC_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.INVALID_ARGUMENT,  # why not RESOURCE_EXHAUSTED: the module's docstring
    415: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}

# Where each datatype's elements go in InferTensorContents.
_CONTENTS_FIELD = {"BYTES": "bytes_contents", "UINT8": "uint_contents", "FP32": "fp32_contents"}


def grpc_status(http_status: int) -> grpc.StatusCode:
    """The gRPC status code for a RequestError's HTTP status (another 4xx: INVALID_ARGUMENT; else INTERNAL)."""
    if http_status in GRPC_STATUS:
        return GRPC_STATUS[http_status]
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= http_status < 500 else grpc.StatusCode.INTERNAL


def parse_model_infer(request: pb.ModelInferRequest, pixels: oip.PixelsSpec, max_images: int,
                      max_image_bytes: int) -> oip.InferRequest:
    """ModelInferRequest -> InferRequest; RequestError 400 for anything malformed, 413 for more than
    `max_images` images or an image over `max_image_bytes`, with REST's messages where REST has the same fault."""
    if len(request.inputs) != 1:
        raise RequestError(400, f"'inputs' must be a list of one tensor: {oip.IMAGE_INPUT!r} (BYTES, encoded images) "
                                f"or {oip.PIXELS_INPUT!r} ({pixels.describe})")
    tensor = request.inputs[0]
    name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
    oip.check_shape(name, shape)
    data = _tensor_data(request, tensor)
    out = oip.InferRequest(id=request.id or None, classification=_classification(request),
                           outputs=oip.check_output_names([o.name for o in request.outputs]))
    out.images, out.pixels = oip.read_input(name, datatype, shape, data, pixels, max_images, max_image_bytes)
    return out


def payload_bytes(request: pb.ModelInferRequest) -> int:
    """About how much parsing `request` handles: its binary tensors' bytes, and 4 per typed element."""
    typed = sum(len(getattr(t.contents, f)) for t in request.inputs for f in _CONTENTS_FIELD.values()
                if f != "bytes_contents")
    return (sum(len(r) for r in request.raw_input_contents) + 4 * typed
            + sum(len(b) for t in request.inputs for b in t.contents.bytes_contents))


def model_infer_response(model_name: str, version: str, request: oip.InferRequest, probs: np.ndarray,
                         labels: list[str], cams: np.ndarray | None = None) -> pb.ModelInferResponse:
    tensors = oip.output_tensors(request, probs, labels, cams)
    return pb.ModelInferResponse(
        model_name=model_name, model_version=version, id=request.id or "",
        outputs=[pb.ModelInferResponse.InferOutputTensor(**output) for output, _, _ in tensors],
        raw_output_contents=[raw for _, raw, _ in tensors])


def server_metadata(version: str) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name="tuneserve", version=version, extensions=EXTENSIONS)


def model_metadata(name: str, version: str, pixels: oip.PixelsSpec, num_classes: int,
                   cam_grid: list[int] | None = None) -> pb.ModelMetadataResponse:
    """REST's GET /v2/models/{name} answer, field for field."""
    return json_format.ParseDict(oip.model_metadata(name, [version], pixels, num_classes, cam_grid),
                                 pb.ModelMetadataResponse())


def model_config(name: str, version: str, pixels: oip.PixelsSpec, num_classes: int,
                 max_batch_size: int) -> pb.ModelConfigResponse:
    """REST's GET /v2/models/{name}/config answer, as model_config.proto's ModelConfig. Without its
    version_policy: the proto's versions are integers, and a tuneserve version is a string (ModelMetadata's
    `versions` has it)."""
    config = oip.model_config(name, version, pixels, num_classes, max_batch_size)
    config.pop("version_policy")
    return pb.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))


def _tensor_data(request: pb.ModelInferRequest, tensor: pb.ModelInferRequest.InferInputTensor) -> bytes | list[Any]:
    """The input's elements: its raw_input_contents entry (bytes), or its typed contents (a list)."""
    given = [f.name for f, _ in tensor.contents.ListFields()]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise RequestError(400, f"raw_input_contents holds {len(request.raw_input_contents)} tensors for "
                                    f"{len(request.inputs)} input: one entry per input")
        if given:
            raise RequestError(400, f"input {tensor.name!r}: its elements are in raw_input_contents, so its "
                                    f"contents must be empty, got {', '.join(given)}")
        return request.raw_input_contents[0]
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        return []  # a datatype no input takes: oip.read_input says what is accepted
    if not given:
        raise RequestError(400, f"input {tensor.name!r} has neither raw_input_contents nor contents")
    if given != [field]:
        raise RequestError(400, f"input {tensor.name!r}: {tensor.datatype} elements go in contents.{field} (or "
                                f"raw_input_contents), got contents.{', contents.'.join(given)}")
    return list(getattr(tensor.contents, field))


def _classification(request: pb.ModelInferRequest) -> int:
    """k of the classification extension (0: probabilities), from the one requested output's parameters."""
    k = 0
    for output in request.outputs:
        oip.check_output(output.name, 0)
        if "classification" in output.parameters:
            param = output.parameters["classification"]
            kind = param.WhichOneof("parameter_choice")
            k = oip.check_output(output.name, getattr(param, kind) if kind else None) or k
    return k
