"""The Open Inference Protocol (KServe v2, as Triton speaks it over HTTP): inference requests in, responses out.

Codec only, no model and no server: `parse_infer_request` turns a request body (JSON, or JSON followed by
binary tensors, Triton's binary tensor data extension) into the images or pixels to classify and the outputs
asked for; `encode_infer_response` turns probabilities back into the protocol's answer. Every way a request
can be wrong is an RequestError 400 that names the field and what is accepted. The checks of a tensor and of
an output (`check_shape`, `read_input`, `check_output`) and the output's encoding (`output_tensor`) are the
protocol's, not JSON's: the gRPC binding (grpc_codec.py) uses them too, so both answer alike.

What a tuneserve model takes and gives, in protocol terms (GET /v2/models/{name} says the same):
- input `image`, BYTES, shape [N] (or [N, 1]): encoded images (JPEG, PNG, ...). In the binary extension each
  element is its 4-byte little-endian length followed by the bytes, so clients send raw JPEG bytes; in JSON
  each element is the image's base64 text (JSON strings cannot carry raw bytes).
- input `pixels`: images already resized and cropped as the model card says, for clients that preprocess
  themselves, in the form the model's graph takes (`PixelsSpec`): UINT8 [N, S, S, 3] RGB for models that
  normalise inside their graph (every model exported by this tuneserve), FP32 [N, 3, S, S] normalised for
  models exported before.
- output `probabilities`, FP32, shape [N, classes]: softmax probabilities, the labels' order.
  With `"parameters": {"classification": k}` on the output (the classification extension), the output is
  instead BYTES [N, k] of "score:index:label", best first, as Triton answers.
"""
from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuneserve.service.engine.engine import Engine, ImageInput
from tuneserve.service.engine.errors import RequestError
from tuneserve.service.engine.model_version import ModelVersion

HEADER_LENGTH = "inference-header-content-length"  # Triton's binary tensor data extension
IMAGE_INPUT = "image"
PIXELS_INPUT = "pixels"
OUTPUT = "probabilities"
CAMS_OUTPUT = "cams"  # FP32 [N, classes, h, w]: each class's logit at every location (POST /explain's maps)
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository"]
_NUMPY_DTYPE = {"UINT8": np.dtype("u1"), "FP32": np.dtype("<f4")}


@dataclass(frozen=True)
class PixelsSpec:
    """The `pixels` input of one model: its graph's input per image."""

    datatype: str  # "UINT8" or "FP32"
    dims: tuple[int, int, int]  # (S, S, 3) or (3, S, S)

    @classmethod
    def of(cls, input_size: int, takes_pixels: bool) -> "PixelsSpec":
        s = input_size
        return cls("UINT8", (s, s, 3)) if takes_pixels else cls("FP32", (3, s, s))

    @property
    def describe(self) -> str:
        shape = ",".join(str(d) for d in self.dims)
        return f"{self.datatype} [N,{shape}], " + ("RGB, resized and cropped" if self.datatype == "UINT8" else
                                                  "resized, cropped and normalised")


@dataclass
class InferRequest:
    """A parsed v2 inference request: exactly one of `images` (encoded bytes) or `pixels` (arrays)."""

    id: str | None
    images: list[bytes] = field(default_factory=list)
    pixels: np.ndarray | None = None  # (N, *PixelsSpec.dims), the model's input
    classification: int = 0  # k of the classification extension; 0: probabilities
    binary_output: bool = False
    outputs: tuple[str, ...] = (OUTPUT,)  # what to answer, in order: OUTPUT and/or CAMS_OUTPUT

    @property
    def wants_cams(self) -> bool:
        return CAMS_OUTPUT in self.outputs

    @property
    def count(self) -> int:
        return len(self.pixels) if self.pixels is not None else len(self.images)


def pixels_spec(model: ModelVersion) -> PixelsSpec:
    """The `pixels` input `model` takes."""
    return PixelsSpec.of(model.input_size, model.takes_pixels)


async def infer(engine: Engine, model: ModelVersion, request: InferRequest,
                arrived: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The one engine call of a v2 inference request, whichever transport carried it (REST or gRPC):
    (probabilities float32 (N, classes), the maps float32 (N, classes, h, w) when asked for, else None). An
    image that fails fails the request. `arrived`: when the edge began it (Engine.classify)."""
    images = request.pixels if request.pixels is not None else [
        ImageInput(str(i), data) for i, data in enumerate(request.images)]
    result = await engine.classify(model.name, images, version=model.version, explain=request.wants_cams,
                                   arrived=arrived)
    return np.stack(result.results), (np.stack(result.cams) if request.wants_cams else None)


def parse_infer_request(body: bytes, header_length: str | None, pixels: PixelsSpec, max_images: int,
                        max_image_bytes: int) -> InferRequest:
    """`body` and its Inference-Header-Content-Length header (None: all JSON) -> InferRequest; RequestError 400
    for anything malformed, 413 for more than `max_images` images or an image over `max_image_bytes`."""
    header, binary = _split(body, header_length)
    try:
        request = json.loads(header)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the inference request must be a JSON object (with the binary tensor extension, its "
                             f"first {HEADER_LENGTH} bytes)") from None
    if not isinstance(request, dict):
        raise RequestError(400, "the inference request must be a JSON object with an 'inputs' list")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(400, f"'inputs' must be a list of one tensor: {IMAGE_INPUT!r} (BYTES, encoded images) or "
                             f"{PIXELS_INPUT!r} ({pixels.describe})")
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    check_shape(name, shape)
    data = _tensor_bytes(tensor, binary)
    out = InferRequest(id=_request_id(request), **_outputs(request))
    out.images, out.pixels = read_input(name, datatype, shape, tensor["data"] if data is None else data, pixels,
                                        max_images, max_image_bytes)
    return out


def check_shape(name: Any, shape: Any) -> None:
    """RequestError 400 unless `shape` is a list of non-negative integers."""
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise RequestError(400, f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")


def read_input(name: Any, datatype: Any, shape: list[int], data: bytes | list[Any], pixels: PixelsSpec,
               max_images: int, max_image_bytes: int) -> tuple[list[bytes], np.ndarray | None]:
    """The one input tensor of a request, whichever binding carried it -> (encoded images, None) for `image`,
    ([], pixels array) for `pixels`. `data` is the tensor's binary form (bytes: REST's binary extension, gRPC's
    raw_input_contents) or its elements (a list: JSON's 'data', flat or nested; gRPC's typed contents). RequestError
    400 for anything malformed, 413 for more than `max_images` images or an image over `max_image_bytes`."""
    if (name, datatype) == (IMAGE_INPUT, "BYTES"):
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise RequestError(400, f"input {IMAGE_INPUT!r}: shape must be [N] or [N, 1], got {shape}")
        _check_count(shape[0], max_images)
        images = _bytes_elements(data, shape[0])
        for i, image in enumerate(images):
            if not image:
                raise RequestError(400, f"input {IMAGE_INPUT!r}: element {i} is empty")
            if len(image) > max_image_bytes:
                raise RequestError(413, f"input {IMAGE_INPUT!r}: element {i} is {len(image)} bytes; the limit is "
                                     f"{max_image_bytes} (server setting TUNESERVE_MAX_IMAGE_BYTES)")
        return images, None
    if (name, datatype) == (PIXELS_INPUT, pixels.datatype):
        want = [shape[0] if shape else -1, *pixels.dims]
        if len(shape) != 4 or shape[1:] != want[1:]:
            raise RequestError(400, f"input {PIXELS_INPUT!r}: shape must be {want} (N images, RGB, the model's input "
                                 f"size), got {shape}")
        _check_count(shape[0], max_images)
        return [], _numeric_elements(data, shape, datatype)
    raise RequestError(400, f"input {name!r} of datatype {datatype!r} is not accepted by this model: send "
                         f"{IMAGE_INPUT!r} (BYTES, encoded images) or {PIXELS_INPUT!r} ({pixels.describe})")


def check_output(name: Any, classification: Any) -> int:
    """The classification extension's k asked of output `name` (0: probabilities); RequestError 400 for
    another output, a k on the maps, or a k that is not an integer >= 0."""
    if name == CAMS_OUTPUT:
        if classification:
            raise RequestError(400, f"output {CAMS_OUTPUT!r} takes no 'classification': it is every class's map")
        return 0
    if name != OUTPUT:
        raise RequestError(400, f"output {name!r} does not exist: the model's outputs are {OUTPUT!r} and "
                                f"{CAMS_OUTPUT!r} (class activation maps, for models that have them)")
    if not isinstance(classification, int) or isinstance(classification, bool) or classification < 0:
        raise RequestError(400, f"output {OUTPUT!r}: 'classification' must be an integer >= 1 (0: "
                             f"probabilities), got {classification!r}")
    return classification


def encode_infer_response(model_name: str, version: str, request: InferRequest, probs: np.ndarray,
                          labels: list[str], cams: np.ndarray | None = None) -> tuple[bytes, dict[str, str]]:
    """probs float32 (N, classes) (and cams float32 (N, classes, h, w) when asked for) -> (body, headers) of the
    v2 answer: JSON, or JSON + binary tensors in the outputs' order."""
    tensors = output_tensors(request, probs, labels, cams)
    response: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": [o for o, _, _ in tensors]}
    if request.id is not None:
        response["id"] = request.id
    if not request.binary_output:
        for output, _, values in tensors:
            output["data"] = values
        return json.dumps(response).encode(), {"content-type": "application/json"}
    for output, raw, _ in tensors:
        output["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps(response).encode()
    return header + b"".join(raw for _, raw, _ in tensors), {"content-type": "application/octet-stream",
                                                              HEADER_LENGTH: str(len(header))}


def output_tensors(request: InferRequest, probs: np.ndarray, labels: list[str],
                   cams: np.ndarray | None = None) -> list[tuple[dict[str, Any], bytes, list[Any]]]:
    """Every output the request asked for, in its order (output_tensor's form); the maps as FP32 [N, C, h, w]."""
    out = []
    for name in request.outputs:
        if name == CAMS_OUTPUT:
            raw = np.ascontiguousarray(cams, dtype="<f4").tobytes()
            out.append(({"name": CAMS_OUTPUT, "datatype": "FP32", "shape": list(cams.shape)}, raw,
                        cams.astype(np.float32).ravel().tolist()))
        else:
            out.append(output_tensor(request, probs, labels))
    return out


def output_tensor(request: InferRequest, probs: np.ndarray, labels: list[str]) -> tuple[dict[str, Any], bytes, list[Any]]:
    """The answer's output for probs float32 (N, classes): ({name, datatype, shape}, its binary form, its
    elements): FP32 probabilities, or with the classification extension BYTES "score:index:label", best first
    (binary: each a 4-byte little-endian length, then the UTF-8 text)."""
    if request.classification:
        k = min(request.classification, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        strings = [f"{float(probs[n, i])!r}:{i}:{labels[i]}" for n in range(len(probs)) for i in order[n]]
        raw = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in strings)
        return {"name": OUTPUT, "datatype": "BYTES", "shape": [len(probs), k]}, raw, strings
    raw = np.ascontiguousarray(probs, dtype="<f4").tobytes()
    return ({"name": OUTPUT, "datatype": "FP32", "shape": list(probs.shape)}, raw,
            probs.astype(np.float32).ravel().tolist())


def model_metadata(name: str, versions: list[str], pixels: PixelsSpec, num_classes: int,
                   cam_grid: list[int] | None = None) -> dict[str, Any]:
    """GET /v2/models/{name}: what the model takes and gives (`cam_grid` [h, w]: it also gives the maps)."""
    outputs = [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, num_classes]}]
    if cam_grid:
        outputs.append({"name": CAMS_OUTPUT, "datatype": "FP32", "shape": [-1, num_classes, *cam_grid]})
    return {"name": name, "versions": versions, "platform": PLATFORM,
            "inputs": [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                       {"name": PIXELS_INPUT, "datatype": pixels.datatype, "shape": [-1, *pixels.dims]}],
            "outputs": outputs}


def model_config(name: str, version: str, pixels: PixelsSpec, num_classes: int, max_batch_size: int) -> dict[str, Any]:
    """GET /v2/models/{name}/config, Triton's model configuration extension (its JSON form of model_config.proto):
    the inputs without their batch dimension, which max_batch_size stands for."""
    return {"name": name, "platform": PLATFORM, "backend": "onnxruntime", "version_policy": {"specific": {"versions": [version]}},
            "max_batch_size": max_batch_size,
            "input": [{"name": IMAGE_INPUT, "data_type": "TYPE_STRING", "dims": [1],
                       "optional": True},
                      {"name": PIXELS_INPUT, "data_type": f"TYPE_{pixels.datatype}", "dims": list(pixels.dims),
                       "optional": True}],
            "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [num_classes]}],
            "dynamic_batching": {}}


# -- parsing --------------------------------------------------------------------------------------------------

def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 < n <= len(body):
        raise RequestError(400, f"{HEADER_LENGTH}: {header_length!r} must be the length of the JSON header, between 1 "
                             f"and the body's {len(body)} bytes")
    return body[:n], body[n:]


def _request_id(request: dict[str, Any]) -> str | None:
    rid = request.get("id")
    if rid is not None and not isinstance(rid, str):
        raise RequestError(400, f"'id' must be a string, got {rid!r}")
    return rid


def _outputs(request: dict[str, Any]) -> dict[str, Any]:
    """classification k and binary output, from 'outputs' and the request's parameters."""
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(400, "'parameters' must be a JSON object")
    binary = params.get("binary_data_output", False) is True
    classification = 0
    outputs = request.get("outputs")
    names: tuple[str, ...] = (OUTPUT,)
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise RequestError(400, f"'outputs' must be a list of outputs, {OUTPUT!r} and/or {CAMS_OUTPUT!r}")
        names = check_output_names([o.get("name") for o in outputs])
        for o in outputs:
            p = o.get("parameters") or {}
            if not isinstance(p, dict):
                raise RequestError(400, f"output {o.get('name')!r}: 'parameters' must be a JSON object")
            binary = p.get("binary_data", binary) is True
            k = check_output(o.get("name"), p.get("classification", 0))
            classification = k or classification
    return {"classification": classification, "binary_output": binary, "outputs": names}


def check_output_names(names: list[Any]) -> tuple[str, ...]:
    """The requested outputs in order: each of OUTPUT and CAMS_OUTPUT at most once (none listed: OUTPUT)."""
    for name in names:
        check_output(name, 0)
    if len(set(names)) != len(names):
        raise RequestError(400, f"'outputs' names an output twice: {names}")
    return tuple(names) or (OUTPUT,)


def _check_count(n: int, max_images: int) -> None:
    if n < 1:
        raise RequestError(400, "the input holds no image: its first dimension must be at least 1")
    if n > max_images:
        raise RequestError(413, f"{n} images in one request; the limit is {max_images} (server setting "
                             "TUNESERVE_MAX_BATCH_IMAGES); split them over several requests")


def _tensor_bytes(tensor: dict[str, Any], binary: bytes) -> bytes | None:
    """The tensor's binary data (None: its data is in JSON)."""
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(400, f"input {tensor.get('name')!r}: 'parameters' must be a JSON object")
    size = params.get("binary_data_size")
    if size is None:
        if binary:
            raise RequestError(400, "binary data follows the JSON header, but no input declares its "
                                 "'binary_data_size'")
        if "data" not in tensor:
            raise RequestError(400, f"input {tensor.get('name')!r} has neither 'data' nor a 'binary_data_size'")
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise RequestError(400, f"input {tensor.get('name')!r}: binary_data_size {size!r} does not match the "
                             f"{len(binary)} bytes after the JSON header")
    return binary


def _bytes_elements(data: bytes | list[Any], n: int) -> list[bytes]:
    if isinstance(data, bytes):  # 4-byte little-endian length, then the bytes, per element
        out, pos = [], 0
        while pos < len(data):
            if pos + 4 > len(data):
                raise RequestError(400, f"input {IMAGE_INPUT!r}: binary data ends inside an element's 4-byte length")
            (length,) = struct.unpack_from("<I", data, pos)
            pos += 4
            if pos + length > len(data):
                raise RequestError(400, f"input {IMAGE_INPUT!r}: element {len(out)} claims {length} bytes, but only "
                                     f"{len(data) - pos} follow")
            out.append(data[pos:pos + length])
            pos += length
    else:
        values = _flatten(data)
        if not all(isinstance(v, (str, bytes)) for v in values):
            raise RequestError(400, f"input {IMAGE_INPUT!r}: in JSON, each element is an image as base64 text")
        out = []
        for i, v in enumerate(values):
            if isinstance(v, bytes):  # gRPC's contents.bytes_contents: the image itself
                out.append(v)
                continue
            try:
                out.append(base64.b64decode(v, validate=True))
            except (binascii.Error, ValueError):
                raise RequestError(400, f"input {IMAGE_INPUT!r}: element {i} is not base64 text (in JSON, images are "
                                     "sent base64-encoded; raw bytes go in the binary tensor extension)") from None
    if len(out) != n:
        raise RequestError(400, f"input {IMAGE_INPUT!r}: shape says {n} elements, the data holds {len(out)}")
    return out


def _numeric_elements(data: bytes | list[Any], shape: list[int], datatype: str) -> np.ndarray:
    """The `pixels` tensor as a native-order array (uint8 or float32) of `shape`, from binary data or its
    elements."""
    wire = _NUMPY_DTYPE[datatype]
    count = int(np.prod(shape))
    if isinstance(data, bytes):
        if len(data) != count * wire.itemsize:
            raise RequestError(400, f"input {PIXELS_INPUT!r}: shape {shape} needs {count * wire.itemsize} bytes of "
                                 f"{datatype}, got {len(data)}")
        array = np.frombuffer(data, dtype=wire).astype(wire.newbyteorder("="), copy=False)
    else:
        values = _flatten(data)
        if datatype == "UINT8":
            ok = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values)
            wanted = "integers 0..255"
        else:
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            wanted = "numbers"
        if len(values) != count or not ok:
            raise RequestError(400, f"input {PIXELS_INPUT!r}: shape {shape} needs {count} {wanted}, got "
                                 f"{len(values)} values")
        array = np.asarray(values, dtype=wire.newbyteorder("="))
    array = array.reshape(shape)
    if datatype == "FP32" and not np.isfinite(array).all():
        raise RequestError(400, f"input {PIXELS_INPUT!r}: every value must be finite (no NaN or infinity)")
    return array


def _flatten(data: Any) -> list[Any]:
    """The protocol allows data as a flat list or nested in the tensor's shape."""
    if not isinstance(data, list):
        raise RequestError(400, f"'data' must be a list, got {type(data).__name__}")
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out
