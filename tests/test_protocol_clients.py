"""Clients nobody here wrote, against a real server: NVIDIA's tritonclient over the Open Inference Protocol
(binary and JSON BYTES inputs, a UINT8 pixels input, the classification extension) and BentoML's own HTTP clients.
Their answers must equal /classify's on real photos: same top-1, scores within 1e-6."""
from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import httpx
import numpy as np
import pytest

from tuneserve.models.preprocessing import preprocess_pixels
from tuneserve.service.process import running_server
from support import assert_classification_extension, photo_path

pytestmark = pytest.mark.slow

API = "api-key-for-client-tests"
PHOTOS = ["coffee.png", "rocket.jpg"]


@pytest.fixture(scope="module")
def server(model):
    env = {"TUNESERVE_MODELS": model.tag, "TUNESERVE_API_KEY": API, "TUNESERVE_WORKERS": "1",
           "TUNESERVE_MAX_LATENCY_MS": "10000"}
    with running_server(env=env) as url:
        yield url


@pytest.fixture(scope="module")
def reference(server, model) -> dict[str, np.ndarray]:
    """/classify's probabilities per photo, in the labels' order."""
    out = {}
    with httpx.Client(base_url=server, timeout=60, headers={"Authorization": f"Bearer {API}"}) as c:
        for name in PHOTOS:
            scores = {p["label"]: p["score"] for p in
                      c.post("/classify", content=photo_path(name).read_bytes(), params={"top_k": 1000}).json()["predictions"]}
            out[name] = np.array([scores[label] for label in model.card.labels])
    return out


def test_tritonclient(server, model, reference):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.removeprefix("http://"), network_timeout=60)
    def auth() -> dict[str, str]:  # a fresh dict per call: tritonclient adds its own headers to the one it is given
        return {"Authorization": f"Bearer {API}"}

    assert client.is_server_live() and client.is_server_ready()  # probes need no key
    assert client.is_model_ready(model.name, headers=auth())
    assert not client.is_model_ready("nope", headers=auth())
    meta = client.get_model_metadata(model.name, headers=auth())
    assert meta["versions"] == [model.version] and {i["name"] for i in meta["inputs"]} == {"image", "pixels"}
    assert client.get_model_config(model.name, headers=auth())["output"][0]["dims"] == [len(model.card.labels)]
    assert client.get_server_metadata(headers=auth())["name"] == "tuneserve"
    with pytest.raises(triton.InferenceServerException, match="401|Bearer"):
        client.get_model_metadata(model.name)

    encoded = np.array([photo_path(n).read_bytes() for n in PHOTOS], dtype=np.object_)
    expected = np.stack([reference[n] for n in PHOTOS])
    for binary in (True, False):
        image = triton.InferInput("image", [len(PHOTOS)], "BYTES")
        # In JSON a BYTES element must be text: the images go as base64 (the binary extension sends them raw).
        image.set_data_from_numpy(encoded if binary else np.array([base64.b64encode(b) for b in encoded], dtype=np.object_),
                                  binary_data=binary)
        out = triton.InferRequestedOutput("probabilities", binary_data=binary)
        result = client.infer(model.name, [image], outputs=[out], headers=auth())
        probs = result.as_numpy("probabilities")
        assert probs.shape == expected.shape and (probs.argmax(1) == expected.argmax(1)).all()
        np.testing.assert_allclose(probs, expected, atol=1e-6)

    # Classification extension: "score:index:label", best first.
    image = triton.InferInput("image", [len(PHOTOS)], "BYTES")
    image.set_data_from_numpy(encoded)
    top = client.infer(model.name, [image], outputs=[triton.InferRequestedOutput("probabilities", class_count=3)],
                       headers=auth(), model_version=model.version).as_numpy("probabilities")
    assert top.shape == (len(PHOTOS), 3)
    assert_classification_extension(top, expected, model.card.labels)

    # Clients that preprocess themselves send the resized and cropped pixels, UINT8 [N, S, S, 3].
    pixels = np.stack([preprocess_pixels(photo_path(n), model.card.preprocessing) for n in PHOTOS])
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    probs = client.infer(model.name, [tensor], headers=auth()).as_numpy("probabilities")
    np.testing.assert_allclose(probs, expected, atol=1e-6)

    with pytest.raises(triton.InferenceServerException, match="not accepted"):
        bad = triton.InferInput("logits", [1], "BYTES")
        bad.set_data_from_numpy(encoded[:1])
        client.infer(model.name, [bad], headers=auth())
    client.close()


def test_bentoml_clients(server, model, reference):
    import bentoml
    from PIL import Image

    path = photo_path(PHOTOS[1])
    with bentoml.SyncHTTPClient(server, token=API) as client:
        assert {"classify", "classify_batch"} <= set(client.endpoints)
        for image in (path, Image.open(path)):
            answer = client.classify(image=image, top_k=3)
            want = reference[PHOTOS[1]]
            assert answer["model"] == model.tag and len(answer["predictions"]) == 3
            assert answer["predictions"][0]["label"] == model.card.labels[want.argmax()]
            assert abs(answer["predictions"][0]["score"] - want.max()) <= 1e-6
        batch = client.classify_batch(images=[photo_path(n) for n in PHOTOS], top_k=1)
        assert [r["predictions"][0]["label"] for r in batch["results"]] == [
            model.card.labels[reference[n].argmax()] for n in PHOTOS]

    async def use_async() -> dict:
        async with bentoml.AsyncHTTPClient(server, token=API) as client:
            return await client.classify(image=Path(path), top_k=1)

    assert asyncio.run(use_async())["predictions"][0]["label"] == model.card.labels[reference[PHOTOS[1]].argmax()]
