"""Models take uint8 pixels and normalise inside their graph; models exported before (float32 normalised
input) keep working everywhere: the runtime, /classify and the v2 protocol's `pixels` input."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from tuneserve.models.architectures import DEFAULT_ARCH
from tuneserve.models.preprocessing import normalise, preprocess_pixels
from tuneserve.models.runtime import OnnxClassifier
from tuneserve.models.samples import sample_photos
from tuneserve.models.store import save_model
from tuneserve.models.weights import build_model
from support import photo, routes_client


@pytest.fixture(scope="module")
def legacy(model, tmp_path_factory):
    """The built-in model as tuneserve exported models before pixel input: float32 'input' (N, 3, S, S),
    normalised on the host, registered beside the built-in one."""
    path = tmp_path_factory.mktemp("legacy") / "model.onnx"
    net = build_model(DEFAULT_ARCH, 1000, "imagenet").eval()
    size = model.card.preprocessing.input_size
    torch.onnx.export(net, (torch.zeros(2, 3, size, size),), str(path), dynamo=False, opset_version=18,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    card = dataclasses.replace(model.card, files={}, variants={})
    return save_model("legacy-lite0", card, path)


@pytest.fixture(scope="module")
def pixels(model) -> np.ndarray:
    """The sample photos, resized and cropped: uint8 (5, 224, 224, 3)."""
    return np.stack([preprocess_pixels(p, model.card.preprocessing) for p in sample_photos()])


def test_exported_graph_takes_pixels_and_matches_the_host_normalised_network(model, pixels):
    graph_input = onnx.load(str(model.onnx_path)).graph.input[0]
    assert graph_input.name == "pixels" and graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:]] == [224, 224, 3]
    session = OnnxClassifier(model.onnx_path, "cpu")
    assert session.takes_pixels and session.inputs(pixels, model.card.preprocessing) is pixels
    net = build_model(DEFAULT_ARCH, 1000, "imagenet").eval()
    with torch.no_grad():
        reference = net(torch.from_numpy(normalise(pixels, model.card.preprocessing))).numpy()
    np.testing.assert_allclose(session(pixels), reference, atol=1e-4)
    assert model.card.parity["max_abs_logit_diff"] <= 1e-4 and model.card.parity["top1_agreement"] == 1.0


def test_graphs_exported_before_take_normalised_floats(model, legacy, pixels):
    pp = model.card.preprocessing
    old, new = OnnxClassifier(legacy.onnx_path, "cpu"), OnnxClassifier(model.onnx_path, "cpu")
    assert not old.takes_pixels and old.input_shape(4, 224) == (4, 3, 224, 224)
    x = old.inputs(pixels, pp)
    assert x.dtype == np.float32 and x.shape == (5, 3, 224, 224)
    np.testing.assert_allclose(old(x), new(pixels), atol=1e-4)
    with pytest.raises(ValueError, match=r"takes normalised float32 \(N, 3, S, S\), got a uint8 array"):
        old(pixels)
    with pytest.raises(ValueError, match=r"takes uint8 pixels \(N, S, S, 3\), got a float32 array"):
        new(x)


def test_old_and_new_models_serve_the_same_answers_side_by_side(model, legacy):
    with routes_client(None, models=f"{model.tag},{legacy.tag}", max_latency_ms=10_000) as (client, _):
        for name in ("coffee.png", "rocket.jpg"):
            new = client.post(f"/models/{model.name}/classify", content=photo(name), params={"top_k": 5}).json()
            old = client.post(f"/models/{legacy.name}/classify", content=photo(name), params={"top_k": 5}).json()
            assert [p["label"] for p in new["predictions"]] == [p["label"] for p in old["predictions"]]
            np.testing.assert_allclose([p["score"] for p in new["predictions"]],
                                       [p["score"] for p in old["predictions"]], atol=1e-5)
        assert client.get(f"/models/{model.name}").json()["input"] == "uint8 pixels (N, S, S, 3)"
        assert client.get(f"/models/{legacy.name}").json()["input"] == "float32 normalised (N, 3, S, S)"
        # The v2 protocol's `pixels` input is what each graph takes.
        inputs = {m.name: client.get(f"/v2/models/{m.name}").json()["inputs"][1] for m in (model, legacy)}
        assert inputs[model.name] == {"name": "pixels", "datatype": "UINT8", "shape": [-1, 224, 224, 3]}
        assert inputs[legacy.name] == {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 224, 224]}
        x = normalise(preprocess_pixels(photo("coffee.png"), model.card.preprocessing), model.card.preprocessing)
        r = client.post(f"/v2/models/{legacy.name}/infer", json={"inputs": [
            {"name": "pixels", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": x.ravel().tolist()}]})
        assert r.status_code == 200, r.text
        classified = client.post(f"/models/{legacy.name}/classify", content=photo("coffee.png"),
                                 params={"top_k": 1}).json()["predictions"][0]
        probs = r.json()["outputs"][0]["data"]
        assert abs(max(probs) - classified["score"]) <= 1e-5


def test_served_answers_equal_the_full_precision_reference_on_real_photos(model, legacy, hymenoptera):
    """The host-cost changes (uint8 pixels to the engine, normalisation in the graph, one copy per image into the
    batch) change no answer: every hymenoptera val photo (153, 16 per request, as /classify_batch serves them)
    gets the same top-1 as the fp32 reference path (float32 normalised on the host, the graph as exported
    before), and probabilities within 1e-5 (float32 rounding; measured 1e-6). Without ../shared, the 40 of
    its stand-in."""
    photos = sorted((hymenoptera / "val").rglob("*.jpg"))
    assert len(photos) >= 40

    def answers(client, name: str) -> list[dict[str, float]]:
        out = []
        for start in range(0, len(photos), 16):
            files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos[start:start + 16]]
            r = client.post(f"/models/{name}/classify_batch", files=files, params={"top_k": 1000})
            assert r.status_code == 200, r.text
            out += [{p["label"]: p["score"] for p in result["predictions"]} for result in r.json()["results"]]
        return out

    with routes_client(None, models=f"{model.tag},{legacy.tag}", max_latency_ms=60_000) as (client, _):
        served, reference = answers(client, model.name), answers(client, legacy.name)
    labels = model.card.labels
    for got, want in zip(served, reference):
        assert max(got, key=got.get) == max(want, key=want.get)
        np.testing.assert_allclose([got[label] for label in labels], [want[label] for label in labels], atol=1e-5)
