"""POST /explain and /models/{name}/explain in-process: the class activation maps come from the served graph, in
the same batches as classification, agree with the graph run directly, and draw over the photo as sent; a model
exported without them still classifies and answers explain with a 422 that says what to do."""
from __future__ import annotations

import base64
import dataclasses
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tuneserve.models.explain import normalise_heatmap
from tuneserve.models.preprocessing import load_image, preprocess_pixels
from tuneserve.models.runtime import OnnxClassifier
from tuneserve.models.store import save_model
from support import RecordingMetrics, make_engine, photo, routes_client


@pytest.fixture(scope="module")
def without_cams(model):
    """The built-in model's classification graph alone, as models were registered before class activation maps
    (no explain graph, no explain_output on the card)."""
    card = dataclasses.replace(model.card, files={}, variants={}, explain_output=None)
    return save_model("nocams-lite0", card, model.onnx_path)


@pytest.fixture(scope="module")
def served(model, without_cams):
    metrics = RecordingMetrics()
    with routes_client(make_engine(metrics, models=f"{model.tag},{without_cams.tag}", max_latency_ms=30_000)) as pair:
        yield pair[0], metrics


def test_explain_answers_the_top_k_with_maps_that_match_the_graph(served, model):
    client, _ = served
    r = client.post("/explain", content=photo("coffee.png"), params={"top_k": 2})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model"] == model.tag and answer["grid"] == [7, 7]  # Lite0 at 224 px: a 7 x 7 feature grid
    best = answer["predictions"][0]
    assert best["label"] == "espresso" and len(answer["predictions"]) == 2
    # The same as classify's answer, and the maps are the graph's own, normalised.
    classified = client.post("/classify", content=photo("coffee.png"), params={"top_k": 2}).json()["predictions"]
    assert [(p["label"], round(p["score"], 5)) for p in answer["predictions"]] == [
        (p["label"], round(p["score"], 5)) for p in classified]
    session = OnnxClassifier(model.explain_path, "cpu")
    logits, cams = session.explain(preprocess_pixels(photo("coffee.png"), model.card.preprocessing)[None])
    label = model.card.labels.index("espresso")
    np.testing.assert_allclose(np.array(best["heatmap"]), normalise_heatmap(cams[0, label]), atol=1e-4)
    # The overlay is drawn on the photo as sent (its size: coffee.png is under the 1024 px drawing limit).
    overlay = Image.open(io.BytesIO(base64.b64decode(best["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == load_image(photo("coffee.png")).size


def test_accept_png_gives_the_best_class_overlay(served):
    client, _ = served
    r = client.post("/explain", content=photo("chelsea.png"), headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == load_image(photo("chelsea.png")).size


def test_explain_and_classify_share_batches(served, model):
    client, metrics = served
    before = len(metrics.batches)
    names = ["coffee.png", "chelsea.png", "rocket.jpg", "astronaut.png"] * 3

    def ask(i_name):
        i, name = i_name
        path = "/explain" if i % 2 else "/classify"
        return path, name, client.post(path, content=photo(name), params={"top_k": 1})

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, enumerate(names)))
    assert all(r.status_code == 200 for _, _, r in answers), [r.text for _, _, r in answers if r.status_code != 200]
    top = {}
    for path, name, r in answers:
        top.setdefault(name, set()).add(r.json()["predictions"][0]["label"])
    assert all(len(labels) == 1 for labels in top.values()), top  # explain and classify agree on every photo
    calls = metrics.batches[before:]
    assert sum(calls) == len(names) and max(calls) > 1  # some calls carried several requests together


def test_a_model_without_maps_classifies_and_explains_with_a_422(served, without_cams):
    client, _ = served
    assert client.post(f"/models/{without_cams.name}/classify", content=photo("coffee.png")).status_code == 200
    r = client.post(f"/models/{without_cams.name}/explain", content=photo("coffee.png"))
    assert r.status_code == 422 and "tuneserve export RUN_DIR" in r.json()["error"], r.text
    assert client.get(f"/models/{without_cams.name}").json()["version"] == without_cams.version
    assert client.post("/explain", content=b"not an image").status_code == 400


def test_v2_infer_answers_the_maps_as_an_extra_output(served, model, without_cams):
    """The Open Inference Protocol: output `cams` (FP32 [N, classes, h, w]) beside `probabilities`, from the same
    engine call; the model's metadata lists it; a model without maps answers 422 for it and still classifies."""
    import json

    from tuneserve.service.edges import oip

    client, _ = served
    meta = client.get(f"/v2/models/{model.name}").json()
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "cams"]
    assert meta["outputs"][1]["shape"] == [-1, 1000, 7, 7]
    assert [o["name"] for o in client.get(f"/v2/models/{without_cams.name}").json()["outputs"]] == ["probabilities"]
    data = photo("coffee.png")
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(data) + 4}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}},
                                     {"name": "cams", "parameters": {"binary_data": True}}]}).encode()
    body = header + len(data).to_bytes(4, "little") + data
    r = client.post(f"/v2/models/{model.name}/infer", content=body,
                    headers={oip.HEADER_LENGTH: str(len(header)), "content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    n = int(r.headers[oip.HEADER_LENGTH])
    answer, raw = json.loads(r.content[:n]), r.content[n:]
    (probs_out, cams_out) = answer["outputs"]
    assert probs_out["name"] == "probabilities" and cams_out == {
        "name": "cams", "datatype": "FP32", "shape": [1, 1000, 7, 7], "parameters": {"binary_data_size": 4 * 1000 * 49}}
    probs = np.frombuffer(raw[:4000], "<f4")
    cams = np.frombuffer(raw[4000:], "<f4").reshape(1, 1000, 7, 7)
    logits, expected = OnnxClassifier(model.explain_path, "cpu").explain(
        preprocess_pixels(data, model.card.preprocessing)[None])
    np.testing.assert_allclose(cams, expected, atol=1e-4)
    assert model.card.labels[int(probs.argmax())] == "espresso"
    image = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}]
    r = client.post(f"/v2/models/{without_cams.name}/infer", json={"inputs": image, "outputs": [{"name": "cams"}]})
    assert r.status_code == 422 and "tuneserve export RUN_DIR" in r.json()["error"]
    r = client.post(f"/v2/models/{model.name}/infer", json={"inputs": image, "outputs": [{"name": "maps"}]})
    assert r.status_code == 400 and "'probabilities' and 'cams'" in r.json()["error"]
