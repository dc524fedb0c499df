"""The Open Inference Protocol (KServe v2) routes, in-process with the real built-in model: JSON and binary
tensors, BYTES images and UINT8 pixels, the classification extension, versions, and a 4xx JSON error for every
malformed request. (tests/test_protocol_clients.py drives a real server with tritonclient and BentoML's client.)"""
from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest

from tuneserve.models.preprocessing import preprocess_pixels
from tuneserve.service.edges import oip
from support import photo, routes_client

PHOTOS = ["coffee.png", "chelsea.png", "rocket.jpg"]
MAX_BATCH_IMAGES = 4


@pytest.fixture(scope="module")
def client(model):
    with routes_client(None, models=model.tag, max_batch_images=MAX_BATCH_IMAGES, max_image_bytes=1_000_000,
                       max_latency_ms=10_000) as (c, _):
        yield c


@pytest.fixture(scope="module")
def classify(client):
    """name -> /classify's probabilities for that photo, as {label: score} over every class."""
    def answer(name: str) -> dict[str, float]:
        r = client.post("/classify", content=photo(name), params={"top_k": 1000})
        return {p["label"]: p["score"] for p in r.json()["predictions"]}
    return answer


def binary_request(inputs: list[tuple[dict, bytes]], outputs: list[dict] | None = None, **extra) -> tuple[bytes, dict]:
    """A request in the binary tensor data extension: JSON header, then each input's bytes."""
    header = {"inputs": [{**t, "parameters": {"binary_data_size": len(raw)}} for t, raw in inputs], **extra}
    if outputs is not None:
        header["outputs"] = outputs
    text = json.dumps(header).encode()
    return text + b"".join(raw for _, raw in inputs), {oip.HEADER_LENGTH: str(len(text))}


def bytes_elements(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def read_binary_response(r) -> tuple[dict, bytes]:
    n = int(r.headers[oip.HEADER_LENGTH])
    return json.loads(r.content[:n]), r.content[n:]


def test_server_and_model_metadata(client, model):
    assert client.get("/v2").json() == {"name": "tuneserve", "version": __import__("tuneserve").__version__,
                                        "extensions": oip.EXTENSIONS}
    meta = client.get(f"/v2/models/{model.name}").json()
    assert meta["name"] == model.name and meta["versions"] == [model.version] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                              {"name": "pixels", "datatype": "UINT8", "shape": [-1, 224, 224, 3]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]},
                               {"name": "cams", "datatype": "FP32", "shape": [-1, 1000, 7, 7]}]  # the maps: /explain's
    assert client.get(f"/v2/models/{model.name}/versions/{model.version}").json() == meta
    assert client.get(f"/v2/models/{model.name}/ready").status_code == 200
    assert client.get(f"/v2/models/{model.name}/versions/{model.version}/ready").status_code == 200
    config = client.get(f"/v2/models/{model.name}/config").json()
    assert config["max_batch_size"] == MAX_BATCH_IMAGES and config["output"][0]["dims"] == [1000]
    assert config["input"][1] == {"name": "pixels", "data_type": "TYPE_UINT8", "dims": [224, 224, 3], "optional": True}
    for missing in ("/v2/models/nope", "/v2/models/nope/ready", f"/v2/models/{model.name}/versions/v0/ready"):
        r = client.get(missing)
        assert r.status_code == 404 and "error" in r.json(), missing


def test_binary_bytes_input_gives_classify_probabilities(client, model, classify):
    images = [photo(n) for n in PHOTOS]
    body, headers = binary_request([({"name": "image", "datatype": "BYTES", "shape": [3]}, bytes_elements(images))],
                                   outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}], id="r1")
    r = client.post(f"/v2/models/{model.name}/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    header, raw = read_binary_response(r)
    assert header["model_name"] == model.name and header["model_version"] == model.version and header["id"] == "r1"
    (out,) = header["outputs"]
    assert out["name"] == "probabilities" and out["datatype"] == "FP32" and out["shape"] == [3, 1000]
    probs = np.frombuffer(raw, dtype="<f4").reshape(3, 1000)
    labels = model.card.labels
    for name, row in zip(PHOTOS, probs):
        want = classify(name)
        assert labels[int(row.argmax())] == max(want, key=want.get)
        np.testing.assert_allclose(row, [want[label] for label in labels], atol=1e-6)


def test_json_base64_input_and_classification_extension(client, model, classify):
    data = [base64.b64encode(photo(n)).decode() for n in PHOTOS[:2]]
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1], "data": data}],
               "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}
    r = client.post(f"/v2/models/{model.name}/versions/{model.version}/infer", json=request)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    (out,) = r.json()["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [2, 3]
    for name, row in zip(PHOTOS[:2], np.array(out["data"]).reshape(2, 3)):
        want = sorted(classify(name).items(), key=lambda kv: -kv[1])[:3]
        parsed = [s.split(":", 2) for s in row]
        assert [label for _, _, label in parsed] == [label for label, _ in want]
        assert [model.card.labels[int(i)] for _, i, _ in parsed] == [label for label, _ in want]
        np.testing.assert_allclose([float(score) for score, _, _ in parsed], [s for _, s in want], atol=1e-6)


def test_uint8_pixels_input_skips_preprocessing(client, model, classify):
    pixels = np.stack([preprocess_pixels(photo(n), model.card.preprocessing) for n in PHOTOS[:2]])  # (2,224,224,3)
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 224, 224, 3)
    body, headers = binary_request([({"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape)},
                                     pixels.tobytes())], parameters={"binary_data_output": True})
    r = client.post(f"/v2/models/{model.name}/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    header, raw = read_binary_response(r)  # no outputs named: every output binary, as tritonclient asks
    probs = np.frombuffer(raw, dtype="<f4").reshape(2, 1000)
    for name, row in zip(PHOTOS[:2], probs):
        want = classify(name)
        np.testing.assert_allclose(row, [want[label] for label in model.card.labels], atol=1e-6)
    # The same in JSON, one image.
    request = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 224, 224, 3],
                           "data": pixels[0].ravel().tolist()}]}
    r = client.post(f"/v2/models/{model.name}/infer", json=request)
    np.testing.assert_allclose(r.json()["outputs"][0]["data"], probs[0], atol=1e-6)


@pytest.mark.parametrize("body, headers, status, fragment", [
    (b"not json", {}, 400, "JSON object"),
    (b"[]", {}, 400, "JSON object"),
    (json.dumps({"inputs": []}).encode(), {}, 400, "list of one tensor"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]}).encode(), {}, 400,
     "'x' of datatype 'BYTES' is not accepted"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}).encode(), {},
     400, "not base64"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["aGk="]}]}).encode(), {},
     400, "shape says 2 elements, the data holds 1"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]}).encode(), {},
     400, "not an image"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [5], "data": ["aGk="] * 5}]}).encode(), {},
     413, "TUNESERVE_MAX_BATCH_IMAGES"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}],
                 "outputs": [{"name": "logits"}]}).encode(), {}, 400, "output 'logits' does not exist"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}],
                 "outputs": [{"name": "probabilities", "parameters": {"classification": -1}}]}).encode(), {}, 400,
     "'classification' must be an integer"),
    (json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 8, 8, 3], "data": [0] * 192}]}).encode(),
     {}, 400, "shape must be [1, 224, 224, 3]"),
    (*binary_request([({"name": "pixels", "datatype": "UINT8", "shape": [1, 224, 224, 3]}, b"\0" * 8)]), 400,
     "needs 150528 bytes of UINT8"),
    (json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": [0.0]}]}).encode(),
     {}, 400, "'pixels' of datatype 'FP32' is not accepted by this model: send 'image' (BYTES, encoded images) or "
              "'pixels' (UINT8 [N,224,224,3]"),
    (b'{"inputs": []}', {oip.HEADER_LENGTH: "999"}, 400, "must be the length of the JSON header"),
])
def test_bad_requests_are_4xx_json(client, model, body, headers, status, fragment):
    r = client.post(f"/v2/models/{model.name}/infer", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and fragment in r.json()["error"], r.json()


def test_uint8_pixels_in_json_must_be_bytes(client, model):
    values = [0] * (224 * 224 * 3 - 1) + [256]
    r = client.post(f"/v2/models/{model.name}/infer",
                    json={"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 224, 224, 3], "data": values}]})
    assert r.status_code == 400 and "needs 150528 integers 0..255" in r.json()["error"]


def test_binary_bytes_length_prefix_must_fit(client, model):
    raw = struct.pack("<I", 1000) + b"short"
    body, headers = binary_request([({"name": "image", "datatype": "BYTES", "shape": [1]}, raw)])
    r = client.post(f"/v2/models/{model.name}/infer", content=body, headers=headers)
    assert r.status_code == 400 and "claims 1000 bytes, but only 5 follow" in r.json()["error"]
    r = client.post(f"/v2/models/{model.name}/versions/old/infer", json={"inputs": []})
    assert r.status_code == 404 and f"serves version {model.version!r}" in r.json()["error"]
