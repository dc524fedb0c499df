"""The Open Inference Protocol over gRPC, against a real server with two workers: NVIDIA's tritonclient.grpc
(sync and asyncio) and the protocol's own stub. Its answers must equal REST's /v2 infer for the same photos;
its errors carry REST's messages under the gRPC status codes (service/edges/grpc_codec.py)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest

from tuneserve.models.preprocessing import preprocess_pixels
from tuneserve.service.process import free_port, running_server
from support import assert_classification_extension, photo_path

pytestmark = pytest.mark.slow

API = "api-key-for-grpc-tests"
PHOTOS = ["coffee.png", "rocket.jpg"]
MAX_BATCH_IMAGES = 4
MAX_IN_FLIGHT = 3  # a request of 4 images passes the first look (1 image) and is refused by the engine's
LATENCY_MS = 10_000  # generous: this machine's 2 cores are shared; also how long a refusal is held
MAX_REQUEST_BYTES = 3_000_000


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """(REST URL, gRPC target, server log) of one server for the module, on the default 2 CPU workers."""
    grpc_port = free_port()
    log_path = tmp_path_factory.mktemp("grpc-server") / "server.log"
    env = {"TUNESERVE_MODELS": model.tag, "TUNESERVE_API_KEY": API, "TUNESERVE_GRPC_PORT": str(grpc_port),
           "TUNESERVE_MAX_LATENCY_MS": str(LATENCY_MS), "TUNESERVE_MAX_BATCH_IMAGES": str(MAX_BATCH_IMAGES),
           "TUNESERVE_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT), "TUNESERVE_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES)}
    with running_server(env=env, log_path=log_path) as url:
        # Ready means one worker serves; the tests want both (each logs its gRPC start).
        deadline = time.monotonic() + 120
        while len(grpc_starts(log_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        yield url, f"127.0.0.1:{grpc_port}", log_path


def grpc_starts(log_path: Path) -> list[str]:
    return [line for line in log_path.read_text().splitlines() if "Open Inference Protocol over gRPC on" in line]


def auth(key: str = API) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}  # gRPC metadata names are lower case


def rest(server, method: str, path: str, **kwargs) -> httpx.Response:
    with httpx.Client(base_url=server[0], timeout=60, headers={"Authorization": f"Bearer {API}"}) as c:
        return c.request(method, path, **kwargs)


def jpeg_bytes() -> np.ndarray:
    return np.array([photo_path(n).read_bytes() for n in PHOTOS], dtype=np.object_)


@pytest.fixture(scope="module")
def reference(server, model) -> np.ndarray:
    """REST's /v2 infer for PHOTOS in one request: probabilities (N, classes)."""
    import tritonclient.http as triton_http

    client = triton_http.InferenceServerClient(server[0].removeprefix("http://"), network_timeout=60)
    image = triton_http.InferInput("image", [len(PHOTOS)], "BYTES")
    image.set_data_from_numpy(jpeg_bytes())
    probs = client.infer(model.name, [image], headers={"Authorization": f"Bearer {API}"}).as_numpy("probabilities")
    client.close()
    return probs


def rest_error(server, model, inputs: list[dict]) -> tuple[int, str]:
    """REST's status and message for a JSON /v2 infer request with `inputs`."""
    r = rest(server, "POST", f"/v2/models/{model.name}/infer", json={"inputs": inputs})
    return r.status_code, r.json()["error"]


def test_health_metadata_and_config(server, model):
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(server[1])
    assert client.is_server_live() and client.is_server_ready()  # probes need no key
    assert client.is_model_ready(model.name, headers=auth())
    assert client.is_model_ready(model.name, model.version, headers=auth())
    assert not client.is_model_ready("nope", headers=auth())

    meta = client.get_model_metadata(model.name, headers=auth())
    rest_meta = rest(server, "GET", f"/v2/models/{model.name}").json()
    assert (meta.name, list(meta.versions), meta.platform) == (rest_meta["name"], rest_meta["versions"],
                                                               rest_meta["platform"])
    for got, want in ((meta.inputs, rest_meta["inputs"]), (meta.outputs, rest_meta["outputs"])):
        assert [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in got] == want

    config = client.get_model_config(model.name, headers=auth()).config
    assert config.max_batch_size == MAX_BATCH_IMAGES and config.platform == "onnxruntime_onnx"
    assert [(i.name, list(i.dims), i.optional) for i in config.input] == [("image", [1], True),
                                                                         ("pixels", [224, 224, 3], True)]
    assert list(config.output[0].dims) == [len(model.card.labels)]

    server_meta = client.get_server_metadata(headers=auth())
    assert server_meta.name == "tuneserve" and set(server_meta.extensions) == {"classification", "model_configuration"}

    # Keys: REST's 401 messages, as UNAUTHENTICATED.
    for headers, why in ((None, "no 'Authorization: Bearer <key>' header"), (auth("wrong"), "the key is wrong")):
        with pytest.raises(triton.InferenceServerException) as e:
            client.get_model_metadata(model.name, headers=headers)
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        assert e.value.message() == f"{why}: inference.GRPCInferenceService/ModelMetadata needs the server's TUNESERVE_API_KEY"
    with pytest.raises(triton.InferenceServerException) as e:
        client.get_model_metadata("nope", headers=auth())
    assert e.value.status() == "StatusCode.NOT_FOUND" and "'nope'" in e.value.message()
    client.close()


def test_infer_equals_rest(server, model, reference):
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(server[1])
    image = triton.InferInput("image", [len(PHOTOS)], "BYTES")
    image.set_data_from_numpy(jpeg_bytes())  # raw_input_contents: the JPEG and PNG files as they are
    result = client.infer(model.name, [image], headers=auth(), request_id="r-1")
    probs = result.as_numpy("probabilities")
    assert result.get_response().id == "r-1" and result.get_response().model_version == model.version
    assert probs.shape == reference.shape and (probs.argmax(1) == reference.argmax(1)).all()
    np.testing.assert_allclose(probs, reference, atol=1e-6)

    # Classification extension: "score:index:label", best first.
    top = client.infer(model.name, [image], headers=auth(), model_version=model.version,
                       outputs=[triton.InferRequestedOutput("probabilities", class_count=3)]).as_numpy("probabilities")
    assert top.shape == (len(PHOTOS), 3)
    assert_classification_extension(top, reference, model.card.labels)

    # Clients that preprocess themselves: UINT8 [N, S, S, 3].
    pixels = np.stack([preprocess_pixels(photo_path(n), model.card.preprocessing) for n in PHOTOS])
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    np.testing.assert_allclose(client.infer(model.name, [tensor], headers=auth()).as_numpy("probabilities"),
                               reference, atol=1e-6)
    client.close()


def test_typed_contents(server, model, reference):
    """Elements in the input's contents instead of raw_input_contents (clients other than tritonclient)."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    def request(**contents) -> service_pb2.ModelInferRequest:
        tensor = service_pb2.ModelInferRequest.InferInputTensor(
            name="image", datatype="BYTES", shape=[len(PHOTOS)], contents=service_pb2.InferTensorContents(**contents))
        return service_pb2.ModelInferRequest(model_name=model.name, inputs=[tensor])

    with grpc.insecure_channel(server[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answer = stub.ModelInfer(request(bytes_contents=list(jpeg_bytes())), metadata=tuple(auth().items()), timeout=60)
        probs = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(reference.shape)
        np.testing.assert_allclose(probs, reference, atol=1e-6)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request(int_contents=[1, 2]), metadata=tuple(auth().items()), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == ("input 'image': BYTES elements go in contents.bytes_contents (or "
                                     "raw_input_contents), got contents.int_contents")


def test_errors_carry_rest_messages(server, model):
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(server[1])
    photo = photo_path(PHOTOS[1]).read_bytes()

    def grpc_error(name: str, elements: list[bytes], **kwargs) -> triton.InferenceServerException:
        tensor = triton.InferInput(name, [len(elements)], "BYTES")
        tensor.set_data_from_numpy(np.array(elements, dtype=np.object_))
        with pytest.raises(triton.InferenceServerException) as e:
            client.infer(kwargs.pop("model_name", model.name), [tensor], headers=auth(), **kwargs)
        return e.value

    def b64(items: list[bytes]) -> list[str]:
        import base64

        return [base64.b64encode(b).decode() for b in items]

    cases = [  # (name, elements): what REST answers 400 or 413 for, sent in JSON to REST
        ("logits", [photo]),                     # an input the model does not take
        ("image", [photo] * (MAX_BATCH_IMAGES + 1)),  # over TUNESERVE_MAX_BATCH_IMAGES (REST: 413)
        ("image", [b"not an image"]),            # the engine cannot decode it
    ]
    for name, elements in cases:
        status, message = rest_error(server, model, [{"name": name, "datatype": "BYTES", "shape": [len(elements)],
                                                      "data": b64(elements)}])
        assert status in (400, 413, 415), (status, message)
        got = grpc_error(name, elements)
        assert (got.status(), got.message()) == ("StatusCode.INVALID_ARGUMENT", message)

    # Not served: NOT_FOUND with REST's 404 message.
    got = grpc_error("image", [photo], model_version="not-a-version")
    r = rest(server, "POST", f"/v2/models/{model.name}/versions/not-a-version/infer", json={})
    assert r.status_code == 404 and (got.status(), got.message()) == ("StatusCode.NOT_FOUND", r.json()["error"])
    assert grpc_error("image", [photo], model_name="nope").status() == "StatusCode.NOT_FOUND"

    # A message over TUNESERVE_MAX_REQUEST_BYTES is refused by gRPC itself.
    assert grpc_error("image", [b"x" * MAX_REQUEST_BYTES]).status() == "StatusCode.RESOURCE_EXHAUSTED"

    # No key, no inference; the answer says which key.
    tensor = triton.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([photo], dtype=np.object_))
    with pytest.raises(triton.InferenceServerException) as e:
        client.infer(model.name, [tensor])
    assert e.value.status() == "StatusCode.UNAUTHENTICATED" and "TUNESERVE_API_KEY" in e.value.message()
    client.close()
    assert "Traceback" not in Path(server[2]).read_text()  # every error above was a RequestError, answered as such


def test_asyncio_client_and_paced_refusal(server, model, reference):
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.grpc import InferenceServerException

    def images(n: int) -> triton_aio.InferInput:
        tensor = triton_aio.InferInput("image", [n], "BYTES")
        tensor.set_data_from_numpy(np.resize(jpeg_bytes(), n))
        return tensor

    async def refused(client) -> tuple[float, InferenceServerException]:
        started = time.monotonic()
        try:
            await client.infer(model.name, [images(MAX_BATCH_IMAGES)], headers=auth())
        except InferenceServerException as e:
            return time.monotonic() - started, e
        raise AssertionError(f"{MAX_BATCH_IMAGES} images with TUNESERVE_MAX_IN_FLIGHT={MAX_IN_FLIGHT} were taken")

    async def use() -> tuple[list[np.ndarray], tuple[float, InferenceServerException]]:
        async with triton_aio.InferenceServerClient(server[1]) as client:
            assert await client.is_server_ready() and await client.is_model_ready(model.name, headers=auth())
            assert (await client.get_model_metadata(model.name, headers=auth())).versions == [model.version]
            # A refusal is held until the latency bound, as REST holds it, while other requests are answered.
            held = asyncio.ensure_future(refused(client))
            answers = [await client.infer(model.name, [images(len(PHOTOS))], headers=auth()) for _ in range(3)]
            return [a.as_numpy("probabilities") for a in answers], await held

    answers, (waited, error) = asyncio.run(use())
    for probs in answers:
        np.testing.assert_allclose(probs, reference, atol=1e-6)
    assert error.status() == "StatusCode.UNAVAILABLE" and "server overloaded" in error.message()
    assert f"TUNESERVE_MAX_IN_FLIGHT={MAX_IN_FLIGHT}" in error.message()
    assert waited >= 0.9 * LATENCY_MS / 1000, waited


def test_every_worker_serves_the_port(server, model):
    """Both workers listen on the one port (SO_REUSEPORT) and the kernel gives each some of the connections."""
    import tritonclient.grpc as triton

    port = int(server[1].rsplit(":", 1)[1])
    started = grpc_starts(server[2])
    assert len(started) == 2 and all(f"127.0.0.1:{port}" in line for line in started), started

    # A channel of its own per client (gRPC shares connections between like channels otherwise).
    clients = [triton.InferenceServerClient(server[1], channel_args=[("grpc.use_local_subchannel_pool", 1)])
               for _ in range(16)]
    try:
        assert all(c.is_model_ready(model.name, headers=auth()) for c in clients)
        sockets = [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.pid]
        listening = {c.pid for c in sockets if c.status == psutil.CONN_LISTEN}
        answering = {c.pid for c in sockets if c.status == psutil.CONN_ESTABLISHED}
        assert len(listening) == 2 and answering == listening, (listening, answering)
    finally:
        for c in clients:
            c.close()


def test_a_second_server_on_the_port_is_refused(server, model):
    """SO_REUSEPORT would let another server take half of this one's gRPC connections: `tuneserve serve` on
    the same --grpc-port says where it would serve, then stops with the reason."""
    import os
    import subprocess
    import sys

    port = server[1].rsplit(":", 1)[1]
    out = subprocess.run([sys.executable, "-m", "tuneserve", "serve", "--model", model.tag, "--port", str(free_port()),
                          "--grpc-port", port], env={**os.environ, "TUNESERVE_API_KEY": API},
                         capture_output=True, text=True, timeout=180)
    assert f"; Open Inference Protocol over gRPC on 127.0.0.1:{port}" in out.stdout, out.stdout
    assert out.returncode == 1
    assert f"error: cannot serve gRPC on 127.0.0.1:{port} (TUNESERVE_GRPC_PORT={port})" in out.stderr, out.stderr[-2000:]


# -- the codec alone: the ways a ModelInferRequest can carry a tensor, and REST's checks on each ---------------

def infer_request(datatype: str, shape: list[int], name: str = "pixels", raw: bytes | None = None,
                  outputs: list | None = None, **contents):
    from tuneserve.service.edges.oip_proto import grpc_service_pb2 as pb

    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape,
                                                   contents=pb.InferTensorContents(**contents))
    return pb.ModelInferRequest(model_name="m", inputs=[tensor], raw_input_contents=[] if raw is None else [raw],
                                outputs=outputs or [])


def test_codec_reads_typed_contents_as_it_reads_raw_bytes():
    from tuneserve.service.edges import grpc_codec, oip
    from tuneserve.service.engine.errors import RequestError

    uint8 = oip.PixelsSpec("UINT8", (4, 4, 3))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    parse = lambda request, spec=uint8: grpc_codec.parse_model_infer(request, spec, 4, 1000)  # noqa: E731
    raw = parse(infer_request("UINT8", [2, 4, 4, 3], raw=pixels.tobytes())).pixels
    typed = parse(infer_request("UINT8", [2, 4, 4, 3], uint_contents=pixels.ravel().tolist())).pixels
    np.testing.assert_array_equal(raw, pixels)
    np.testing.assert_array_equal(typed, pixels)

    fp32 = oip.PixelsSpec("FP32", (3, 2, 2))  # models exported before pixel input
    values = np.linspace(-2, 2, 12, dtype=np.float32)
    got = parse(infer_request("FP32", [1, 3, 2, 2], fp32_contents=values.tolist()), fp32).pixels
    np.testing.assert_array_equal(got, values.reshape(1, 3, 2, 2))

    def message(request, spec=uint8) -> str:
        with pytest.raises(RequestError) as e:
            parse(request, spec)
        assert e.value.status == 400
        return e.value.message

    # REST's messages for the same faults (oip.py)
    assert message(infer_request("UINT8", [1, 4, 4, 3], uint_contents=[256] * 48)) == (
        "input 'pixels': shape [1, 4, 4, 3] needs 48 integers 0..255, got 48 values")
    assert message(infer_request("FP32", [1, 3, 2, 2], fp32_contents=[float("nan")] * 12), fp32) == (
        "input 'pixels': every value must be finite (no NaN or infinity)")
    assert message(infer_request("UINT8", [1, 4, 4, 3], raw=b"\0" * 47)) == (
        "input 'pixels': shape [1, 4, 4, 3] needs 48 bytes of UINT8, got 47")
    # gRPC's own ways to be wrong
    assert message(infer_request("UINT8", [1, 4, 4, 3])) == "input 'pixels' has neither raw_input_contents nor contents"
    assert message(infer_request("UINT8", [1, 4, 4, 3], raw=b"\0" * 48, uint_contents=[0] * 48)) == (
        "input 'pixels': its elements are in raw_input_contents, so its contents must be empty, got uint_contents")
    two_raw = infer_request("UINT8", [1, 4, 4, 3], raw=b"\0" * 48)
    two_raw.raw_input_contents.append(b"")
    assert message(two_raw) == "raw_input_contents holds 2 tensors for 1 input: one entry per input"


def test_codec_classification_parameter_and_answer():
    from tuneserve.service.edges import grpc_codec, oip
    from tuneserve.service.edges.oip_proto import grpc_service_pb2 as pb
    from tuneserve.service.engine.errors import RequestError

    def output(name: str = "probabilities", **param):
        out = pb.ModelInferRequest.InferRequestedOutputTensor(name=name)
        if param:
            out.parameters["classification"].CopyFrom(pb.InferParameter(**param))
        return out

    spec = oip.PixelsSpec("UINT8", (1, 1, 3))
    parse = lambda outputs: grpc_codec.parse_model_infer(  # noqa: E731
        infer_request("UINT8", [1, 1, 1, 3], raw=b"\1\2\3", outputs=outputs), spec, 4, 1000)
    assert parse([output(int64_param=2)]).classification == 2
    assert parse([output()]).classification == 0
    assert parse([output(), output("cams")]).outputs == ("probabilities", "cams")  # the maps beside the scores
    for bad, message in (([output(bool_param=True)], "'classification' must be an integer >= 1 (0: probabilities), "
                                                     "got True"),
                         ([output("logits")], "output 'logits' does not exist: the model's outputs are 'probabilities' "
                                              "and 'cams' (class activation maps, for models that have them)"),
                         ([output(), output()], "'outputs' names an output twice: ['probabilities', 'probabilities']")):
        with pytest.raises(RequestError) as e:
            parse(bad)
        assert e.value.status == 400 and e.value.message.endswith(message), e.value.message

    probs = np.array([[0.1, 0.7, 0.2]], dtype=np.float32)
    answer = grpc_codec.model_infer_response("m", "v1", parse([output(int64_param=2)]), probs, ["a", "b", "c"])
    (out,) = answer.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("probabilities", "BYTES", [1, 2])
    raw = answer.raw_output_contents[0]  # REST's binary form: 4-byte length, then the text, per element
    first = int.from_bytes(raw[:4], "little")
    assert raw[4:4 + first].decode() == f"{float(probs[0, 1])!r}:1:b"
    plain = grpc_codec.model_infer_response("m", "v1", parse([]), probs, ["a", "b", "c"])
    np.testing.assert_array_equal(np.frombuffer(plain.raw_output_contents[0], "<f4"), probs.ravel())
