"""The service's endpoints in-process, real model, real photos: the routes (`create_app`) over a Worker
built from ServiceConfig settings, behind Starlette's TestClient, which runs every request on one event loop, so the
dynamic batcher, the thread pool and the limits work as under `bentoml serve`; and BentoML's own endpoints
(/livez, /readyz, /metrics, the OpenAPI document) through the BentoML service's ASGI app."""
from __future__ import annotations

import importlib
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tuneserve.models.runtime import OnnxClassifier, softmax
from tuneserve.service.edges.routes import create_app
from support import RecordingMetrics, builtin_model, encode, make_engine, model_inputs, photo, routes_client

MAX_IMAGE_BYTES = 2_000_000  # small limits, so that the tests stay small
MAX_PIXELS = 4_000_000
MAX_BATCH_IMAGES = 4


@pytest.fixture(scope="module")
def metrics() -> RecordingMetrics:
    return RecordingMetrics()


@pytest.fixture(scope="module")
def served(model, metrics):
    # A generous latency bound: 24 requests at once on 2 cores wait ~0.35 s, which admission would refuse under
    # the CPU default of 1 s (30% of it); the overload test below sets its own limit.
    with routes_client(make_engine(metrics, models=model.tag, max_image_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_PIXELS,
                                   max_batch_images=MAX_BATCH_IMAGES, max_latency_ms=10_000)) as pair:
        yield pair


@pytest.fixture(scope="module")
def client(served):
    return served[0]


@pytest.fixture(scope="module")
def engine(served):
    return served[1]


@pytest.fixture(scope="module")
def bento_client(model):
    """The BentoML service's whole ASGI app; it serves the built-in model (TUNESERVE_MODEL unset)."""
    import importlib

    from starlette.testclient import TestClient

    service = importlib.import_module("tuneserve.service.service")
    assert service.PLAN.model.tag == model.tag
    with TestClient(service.Classifier.to_asgi(), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def reference(model):
    """What the model says when called directly: the HTTP answers must match it."""
    session = OnnxClassifier(model.onnx_path, device="cpu")

    def probs(data: bytes) -> np.ndarray:
        return softmax(session(model_inputs(session, [data], model.card.preprocessing)))[0]

    return probs


def top1(answer: dict) -> str:
    return answer["predictions"][0]["label"]


def assert_error(r, status: int, *fragments: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    message = r.json()["error"]
    for f in fragments:
        assert f in message, message


# -- answers -----------------------------------------------------------------------------------------------

def test_raw_body_answer_matches_the_model(client, model, reference):
    data = photo("coffee.png")
    r = client.post("/classify", content=data, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model.tag
    assert len(body["predictions"]) == 5  # default top_k
    assert top1(body) == "espresso"
    expected = reference(data)
    for p in body["predictions"]:
        assert p["score"] == pytest.approx(float(expected[model.card.labels.index(p["label"])]), abs=1e-5)
    scores = [p["score"] for p in body["predictions"]]
    assert scores == sorted(scores, reverse=True)


def test_multipart_upload_and_top_k(client):
    data = photo("chelsea.png")
    r = client.post("/classify", files={"image": ("chelsea.png", data, "image/png")}, params={"top_k": 2})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    assert top1(r.json()) in ("tiger cat", "tabby", "Egyptian cat")
    r = client.post("/classify", files={"image": ("chelsea.png", data)}, data={"top_k": "3"})
    assert len(r.json()["predictions"]) == 3  # a form field works too
    # Content-Type is advisory: curl --data-binary sends application/x-www-form-urlencoded.
    r = client.post("/classify", content=data, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and top1(r.json()) == top1(client.post("/classify", content=data).json())


def test_top_k_larger_than_the_classes_is_clamped(client):
    r = client.post("/classify", content=photo("coffee.png"), params={"top_k": 5000})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1000


@pytest.mark.parametrize("fmt, params", [("JPEG", {"quality": 95}), ("WEBP", {"lossless": True}), ("GIF", {}),
                                         ("BMP", {}), ("TIFF", {}), ("PNG", {})])
def test_every_served_format(client, reference, fmt, params):
    data = encode(Image.open(io_bytes(photo("coffee.png"))).convert("RGB"), fmt, **params)
    r = client.post("/classify", content=data)
    assert r.status_code == 200, r.text
    assert top1(r.json()) == photo_top1(reference, data)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_image_modes_become_rgb(client, reference, mode):
    rgb = Image.open(io_bytes(photo("coffee.png"))).convert("RGB")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)  # uint16 -> I;16
    else:
        img = rgb.convert(mode)
    data = encode(img, "JPEG" if mode == "CMYK" else "PNG")
    assert Image.open(io_bytes(data)).mode == mode
    r = client.post("/classify", content=data)
    assert r.status_code == 200, r.text
    assert top1(r.json()) == photo_top1(reference, data)
    if mode in ("P", "RGBA", "CMYK"):
        assert top1(r.json()) == "espresso"  # colour survives these conversions


def test_exif_orientation_is_applied(client, reference):
    upright = Image.open(io_bytes(photo("coffee.png"))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored_sideways = upright.transpose(Image.Transpose.ROTATE_90)
    with_exif = encode(stored_sideways, "PNG", exif=exif)
    without_exif = encode(stored_sideways, "PNG")
    expected = client.post("/classify", content=encode(upright, "PNG"), params={"top_k": 3}).json()
    assert client.post("/classify", content=with_exif, params={"top_k": 3}).json() == expected
    assert client.post("/classify", content=without_exif, params={"top_k": 3}).json() != expected


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animations_use_their_first_frame(client, fmt):
    first = Image.open(io_bytes(photo("coffee.png"))).convert("RGB")
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (first.height, first.width, 3), dtype=np.uint8)) for _ in range(2)]
    lossless = {"lossless": True} if fmt == "WEBP" else {}  # same pixels in both files
    animated = encode(first, fmt, save_all=True, append_images=noise, duration=100, loop=0, **lossless)
    assert getattr(Image.open(io_bytes(animated)), "n_frames", 1) == 3
    single = encode(first, fmt, **lossless)
    assert client.post("/classify", content=animated).json() == client.post("/classify", content=single).json()


def test_batch_answers_in_order_with_per_image_errors(client, model):
    names = ["coffee.png", "chelsea.png", "rocket.jpg"]
    files = [("images", (n, photo(n))) for n in names]
    files.insert(1, ("images", ("notes.txt", b"not an image")))
    r = client.post("/classify_batch", files=files, params={"top_k": 1})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["coffee.png", "notes.txt", "chelsea.png", "rocket.jpg"]
    assert results[1]["status"] == 400 and "not an image" in results[1]["error"]
    for name, result in zip(names, [results[0], *results[2:]]):
        single = client.post("/classify", content=photo(name), params={"top_k": 1}).json()
        assert result["predictions"] == single["predictions"]


def test_model_endpoint(client, model):
    info = client.get("/model").json()
    assert info["tag"] == model.tag and info["arch"] == "efficientnet_lite0"
    assert info["num_classes"] == len(info["labels"]) == 1000 and info["input_size"] == 224
    assert info["parity"]["top1_agreement"] == 1.0 and "source" in info["metrics"]
    assert info["runtime"]["provider"] == "CPUExecutionProvider"
    assert info["batching"]["enabled"] is True and info["batching"]["max_batch_size"] > 1
    assert info["limits"]["max_image_bytes"] == MAX_IMAGE_BYTES


def test_bentoml_endpoints_and_openapi(bento_client):
    client = bento_client
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/").status_code == 200  # Swagger UI
    spec = client.get("/docs.json").json()
    assert spec["info"]["version"] == __import__("tuneserve").__version__
    assert {"/classify", "/classify_batch", "/model", "/readyz", "/v2/models/{name}/infer"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    # Every documented path is in the route table (the HTTP protocol answers the others 404 from the headers).
    from tuneserve.service.edges.route_table import RouteTable

    table = RouteTable()
    documented = [re.sub(r"\{[^}]+\}", "x", path) for path in spec["paths"]]
    assert [path for path in documented if not table.is_known(path)] == []
    assert not table.is_known("/wp-login.php") and not table.is_known("/models/x/y")
    r = client.post("/classify", content=photo("coffee.png"))
    assert r.status_code == 200 and top1(r.json()) == "espresso"
    metrics = client.get("/metrics").text
    assert "tuneserve_inference_batch_size_bucket" in metrics and 'endpoint="/classify"' in metrics
    name, version = r.json()["model"].split(":")
    labels = f'model="{name}",status="200",version="{version}"'
    assert f"tuneserve_requests_total{{{labels}}}" in metrics, [m for m in metrics.splitlines() if "requests_total" in m]
    for family in ("tuneserve_request_duration_seconds", "tuneserve_engine_wait_seconds", "tuneserve_inference_seconds"):
        assert f'{family}_count{{model="{name}",version="{version}"}}' in metrics, family


@pytest.mark.parametrize("management", [False, True])
def test_openapi_documents_exactly_the_apps_routes(engine, management):
    from starlette.testclient import TestClient

    app = create_app(lambda: engine, openapi_base=lambda: {"openapi": "3.0.2", "paths": {}}, management=management)
    routes = {(r.path, m.lower()) for r in app.routes for m in r.methods - {"HEAD"} if r.path != "/docs.json"}
    with TestClient(app) as client:
        spec = client.get("/docs.json").json()
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    from tuneserve.service.edges.route_table import CLIENT_ROUTES  # BentoML's API routes, which these answer

    assert documented == routes | {(path, "post") for path in CLIENT_ROUTES}
    assert any(path.startswith("/v2/repository/") for path, _ in routes) == management
    for path, item in spec["paths"].items():
        for op in item.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"\{(\w+)\}", path)), path
            assert all(code.isdigit() for code in op["responses"]), path


def test_every_route_of_the_whole_app_is_in_the_route_table(bento_client):
    """BentoML's routes and ours, as the served ASGI app has them: a route the table does not know would be
    answered 404 by the HTTP protocol, so one added anywhere without its table line fails here."""
    from starlette.routing import Mount

    from tuneserve.service.edges.route_table import ROUTES, RouteTable

    service = importlib.import_module("tuneserve.service.service")
    app = service.Classifier.to_asgi()
    while not hasattr(app, "routes"):  # middleware wrappers around the router
        app = getattr(app, "app")

    def paths(routes, prefix=""):
        for r in routes:
            if isinstance(r, Mount):
                yield from paths(r.routes, prefix + r.path)
            else:
                yield prefix + r.path

    served = set(paths(app.routes))
    table = RouteTable(management=True)
    example = {p: re.sub(r"\{[^}:]+(:path)?\}", "x", p) for p in served}
    assert sorted(p for p, e in example.items() if not table.is_known(e)) == []
    assert {r.path for r in ROUTES if r.handler is not None and not r.management} <= served  # no admin key here


def test_bentoml_api_functions_called_in_process(bento_client, model):
    """What BentoML's clients find in /schema.json also works called directly (the HTTP path is in
    tests/test_protocol_clients.py): same answer as /classify, errors as BentoML's own exceptions."""
    import asyncio

    from bentoml.exceptions import BentoMLException

    from support import photo_path

    schema = bento_client.get("/schema.json").json()
    assert {"classify", "classify_batch"} <= {route["name"] for route in schema["routes"]}
    service = importlib.import_module("tuneserve.service.service")
    instance = service.Classifier.inner()
    try:
        answer = asyncio.run(instance.classify(image=photo_path("coffee.png"), top_k=2))
        over_http = bento_client.post("/classify", content=photo("coffee.png"), params={"top_k": 2}).json()
        assert answer == over_http and top1(answer) == "espresso"
        batch = asyncio.run(instance.classify_batch(images=[photo_path("coffee.png"), photo_path("rocket.jpg")], top_k=1))
        assert [r["filename"] for r in batch["results"]] == ["coffee.png", "rocket.jpg"]
        with pytest.raises(BentoMLException) as bad:
            asyncio.run(instance.classify(image=photo_path("coffee.png"), top_k=0))
        assert bad.value.error_code == 400 and "top_k" in bad.value.message
    finally:
        instance.engine.close()


# -- bad input: a 4xx JSON answer each, and the server keeps serving ------------------------------------------

def test_bad_images(client):
    jpeg = encode(Image.open(io_bytes(photo("coffee.png"))).convert("RGB"), "JPEG")
    assert_error(client.post("/classify", content=b""), 400, "empty image")
    assert_error(client.post("/classify", content=b"%PDF-1.4 definitely not pixels"), 400, "not an image")
    assert_error(client.post("/classify", content=jpeg[: len(jpeg) // 2]), 400, "truncated")
    assert_error(client.post("/classify", content=encode(Image.new("RGB", (32, 32)), "ICO")), 415,
                 "unsupported image format ICO", "JPEG")
    assert_error(client.post("/classify", files={"image": ("empty.jpg", b"")}), 400, "empty image")


def test_byte_and_pixel_limits(client):
    too_big = b"\xff\xd8" + b"\0" * MAX_IMAGE_BYTES
    assert_error(client.post("/classify", content=too_big), 413, f"limit of {MAX_IMAGE_BYTES} bytes",
                 "TUNESERVE_MAX_IMAGE_BYTES")
    assert_error(client.post("/classify", files={"image": ("big.jpg", too_big)}), 413, "TUNESERVE_MAX_IMAGE_BYTES")

    def chunked():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(3):
            yield b"\0" * (MAX_IMAGE_BYTES // 2)

    assert_error(client.post("/classify", content=chunked()), 413, "more than")
    bomb = encode(Image.new("L", (2500, 2000)), "PNG")  # 5 Mpx over a 4 Mpx limit, in a few kB
    assert len(bomb) < 50_000
    assert_error(client.post("/classify", content=bomb), 413, "2500x2000", f"limit of {MAX_PIXELS}")


@pytest.mark.parametrize("top_k, fragment", [("abc", "not an integer"), ("0", "out of range"), ("-1", "out of range"),
                                             ("1.5", "not an integer")])
def test_bad_top_k(client, top_k, fragment):
    assert_error(client.post("/classify", content=photo("coffee.png"), params={"top_k": top_k}), 400, fragment)
    assert_error(client.post("/classify", files={"image": ("c.png", photo("coffee.png"))}, data={"top_k": top_k}),
                 400, fragment)
    assert_error(client.post("/classify_batch", files=[("images", ("c.png", photo("coffee.png")))],
                             params={"top_k": top_k}), 400, fragment)


def test_bad_forms(client):
    coffee = photo("coffee.png")
    assert_error(client.post("/classify", data={"top_k": "3"}, files={"other": ("", b"")}), 400, "'image'")
    assert_error(client.post("/classify", files=[("image", ("a.png", coffee)), ("image", ("b.png", coffee))]), 400,
                 "/classify_batch")
    assert_error(client.post("/classify", content=b"--xyz\r\ngarbage",
                             headers={"content-type": "multipart/form-data; boundary=abc"}), 400)
    assert_error(client.post("/classify_batch", content=coffee), 415, "multipart/form-data")
    assert_error(client.post("/classify_batch", data={"top_k": "1"}, files={"x": ("", b"")}), 400, "no file")
    too_many = [("images", (f"{i}.png", coffee)) for i in range(MAX_BATCH_IMAGES + 1)]
    assert_error(client.post("/classify_batch", files=too_many), 413, f"the limit is {MAX_BATCH_IMAGES}",
                 "TUNESERVE_MAX_BATCH_IMAGES")
    assert client.get("/classify").status_code == 405


def test_still_serving_after_bad_input(client):
    for bad in (b"", b"junk", b"\x89PNG\r\n\x1a\n" + b"\0" * 20):
        assert client.post("/classify", content=bad).status_code == 400
    r = client.post("/classify", content=photo("coffee.png"))
    assert r.status_code == 200 and top1(r.json()) == "espresso"


# -- concurrency -----------------------------------------------------------------------------------------------

def test_concurrent_requests_are_batched_and_answered_correctly(client, metrics):
    batch_sizes = metrics.batches
    names = ["coffee.png", "chelsea.png", "rocket.jpg", "astronaut.png"]
    expected = {n: client.post("/classify", content=photo(n), params={"top_k": 3}).json() for n in names}
    before = len(batch_sizes)
    jobs = [names[i % len(names)] for i in range(128)]
    with ThreadPoolExecutor(24) as pool:  # TestClient sends each thread's request into the app's one loop
        answers = list(pool.map(lambda n: client.post("/classify", content=photo(n), params={"top_k": 3}), jobs))
    assert [a.status_code for a in answers] == [200] * len(jobs)
    for name, a in zip(jobs, answers):
        got, want = a.json()["predictions"], expected[name]["predictions"]
        assert [p["label"] for p in got] == [p["label"] for p in want]
        assert [p["score"] for p in got] == pytest.approx([p["score"] for p in want], abs=1e-5)
    calls = batch_sizes[before:]
    assert sum(calls) == len(jobs) and len(calls) < len(jobs), calls  # fewer inference calls than images
    assert max(calls) > 1  # at least one call carried several images


def test_overload_answers_503_at_the_bound(client, engine, monkeypatch):
    """Refusals are paced: answered when the request's latency bound has passed (here 0.5 s), not at once."""
    monkeypatch.setattr(engine.admission, "max_in_flight", 1)
    monkeypatch.setattr(engine.admission, "bound_s", 0.5)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.post("/classify", content=photo("astronaut.png")), range(16)))
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    held = [a.elapsed.total_seconds() for a in answers if a.status_code == 503]
    assert min(held) >= 0.45, held
    busy = next(a for a in answers if a.status_code == 503)
    assert "TUNESERVE_MAX_IN_FLIGHT=1" in busy.json()["error"] and busy.headers["retry-after"] == "1"
    monkeypatch.undo()
    assert client.post("/classify", content=photo("coffee.png")).status_code == 200


def test_the_bound_counts_from_when_the_route_began_the_request(client, engine, monkeypatch):
    """A body that takes longer than the bound to arrive leaves no time to answer in: 503, not a late 200."""
    monkeypatch.setattr(engine.admission, "bound_s", 0.5)

    def slow_body():  # read by the route (Starlette's TestClient reads it when the app asks for it)
        time.sleep(0.7)
        yield photo("coffee.png")

    late = client.post("/classify", content=slow_body())
    assert late.status_code == 503 and "over the latency bound" in late.json()["error"], late.text
    monkeypatch.undo()
    assert client.post("/classify", content=slow_body()).status_code == 200  # the default bound has room


def test_batching_can_be_switched_off(model):
    from starlette.testclient import TestClient

    metrics = RecordingMetrics()
    # A generous bound: this test is about batching, not about admission refusing work on a busy machine.
    engine = make_engine(metrics, models=model.tag, max_batch_size=1, max_latency_ms=30_000)
    calls = metrics.batches
    with TestClient(create_app(lambda: engine)) as client:
        batching = client.get("/model").json()["batching"]
        assert batching["enabled"] is False and batching["max_batch_size"] == 1
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: client.post("/classify", content=photo("coffee.png")), range(16)))
    engine.close()
    assert all(a.status_code == 200 and top1(a.json()) == "espresso" for a in answers), [
        (a.status_code, a.text[-300:]) for a in answers if a.status_code != 200 or top1(a.json()) != "espresso"]
    assert calls == [1] * 16  # every onnxruntime call ran one image


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_precision_variants_serve_the_same_labels(model, precision):
    """precision fp16 serves the model's fp16 variant (what `auto` picks on a GPU), int8 its INT8 variant (CPU,
    only when asked for); on these photos their top-1 equals fp32's and their scores are within the largest
    difference the export measured."""
    import asyncio

    names = ("coffee.png", "chelsea.png", "rocket.jpg", "grace_hopper.jpg")

    async def best(engine) -> list[tuple[str, float]]:
        deadline, served = engine.admission.deadline(), engine.model(None)
        probs = await served.classify([await served.preprocess(photo(n), deadline) for n in names], deadline)
        return [(served.labels[int(p.argmax())], float(p.max())) for p in probs]

    variant, fp32 = (make_engine(models=model.tag, precision=p) for p in (precision, "auto"))
    assert variant.model(None).describe()["runtime"]["precision"] == precision
    assert fp32.model(None).describe()["runtime"]["precision"] == "fp32"  # auto on a CPU
    assert variant.model(None).describe()["runtime"]["variants"][precision]["kept"] is True
    lower, full = asyncio.run(best(variant)), asyncio.run(best(fp32))
    assert [label for label, _ in lower] == [label for label, _ in full]
    np.testing.assert_allclose([p for _, p in lower], [p for _, p in full],
                               atol=max(0.02, model.card.variants[precision]["max_abs_prob_diff"]))
    variant.close(), fp32.close()


# -- helpers -----------------------------------------------------------------------------------------------------

def io_bytes(data: bytes):
    import io

    return io.BytesIO(data)


def photo_top1(reference, data: bytes) -> str:
    return builtin_model().card.labels[int(np.argmax(reference(data)))]
