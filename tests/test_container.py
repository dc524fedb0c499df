"""The serving image, built and run: bentofile.yaml -> Bento -> podman image -> container that classifies a real
photo the same way as the model does outside it, as a non-root user, with no torch inside.

CI installs podman, runc and debootstrap (.ci/run); elsewhere, without them, the test is skipped with the reason.
Builds a Debian base once (~45 s, reused while its image exists), then the image (~30 s; ~5 s where the package
layer of the same requirements is cached: benchmarks/podman_image.py) and a start (~2 s).
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

import podman_image as cs
from tuneserve.models.runtime import OnnxClassifier, softmax
from tuneserve.models.store import load_model
from tuneserve.service.process import free_port
from support import builtin_model, model_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def podman(tmp_path_factory) -> dict[str, str]:
    missing = cs.missing_tools()
    if missing:
        message = f"container tests need {', '.join(missing)} (apt-get install podman runc debootstrap)"
        if os.environ.get("CI"):
            pytest.fail(message + ": .ci/run installs them, so CI must have them")
        pytest.skip(message)
    return cs.podman_env(tmp_path_factory.mktemp("podman"))


def _in_image(image: str, code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", "run", "--rm", "--entrypoint", "python", image, "-c", code], env=env,
                          capture_output=True, text=True, timeout=120)


def test_image_builds_runs_and_classifies_like_the_model(podman, tmp_path, hymenoptera):
    model = builtin_model()
    env = {**podman, "TUNESERVE_MODEL": model.tag}
    bento_tag = cs.build_bento(cs.bentofile_with_base(tmp_path, cs.ensure_base_image(podman)), env)
    bento_path = Path(os.environ["BENTOML_HOME"], "bentos", *bento_tag.split(":"))  # conftest's BentoML home
    uv_folder = cs.offline_uv_config(bento_path)

    image = f"localhost/tuneserve-test:{uuid.uuid4().hex[:8]}"
    name = f"tuneserve-test-{uuid.uuid4().hex[:8]}"
    port, grpc_port = free_port(), free_port()
    try:
        cs.containerize(bento_tag, image, uv_folder, tmp_path, env)

        # Lean: no torch, torchvision or timm anywhere in the image's Python; serving's packages are there.
        probe = _in_image(image, "import importlib.metadata as m, json; "
                                 "print(json.dumps(sorted(d.metadata['Name'].lower() for d in m.distributions())))",
                          podman)
        assert probe.returncode == 0, probe.stderr
        installed = set(json.loads(probe.stdout))
        assert not installed & {"torch", "torchvision", "timm", "triton"}, installed
        assert {"bentoml", "onnxruntime-gpu", "pillow", "numpy", "uvloop", "httptools", "nvidia-nvimgcodec-cu13",
                "nvidia-nvjpeg", "grpcio", "protobuf"} <= installed
        assert "tritonclient" not in installed  # gRPC's stubs are the service's own (service/edges/oip_proto)
        # The GPU JPEG decoder loads in the image's Python (used only where a GPU is visible).
        nvimgcodec = _in_image(image, "from nvidia import nvimgcodec; print(nvimgcodec.__version__)", podman)
        assert nvimgcodec.returncode == 0 and nvimgcodec.stdout.strip(), nvimgcodec.stderr

        # Started the way deploy/kubernetes/deployment.yaml starts it: its env, user, read-only root, no caps.
        # The API key comes from the Secret the manifest reads; no admin key, so no management API.
        key = secrets.token_hex(16)
        flags = cs.podman_flags_like_kubernetes(cs.deployment_manifest(), {"tuneserve-keys": {"api-key": key}})
        assert "--read-only" in flags and "--cap-drop=ALL" in flags
        subprocess.run(["podman", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:3000",
                        "-p", f"127.0.0.1:{grpc_port}:8001", *flags, image],
                       env=podman, check=True, capture_output=True, timeout=120)
        url = f"http://127.0.0.1:{port}"
        cs.wait_ready(url)
        user = subprocess.run(["podman", "exec", name, "id", "-u"], env=podman, capture_output=True, text=True)
        assert user.stdout.strip() not in ("", "0"), f"the service runs as uid {user.stdout!r}, not a non-root user"
        # The image's own default user is non-root too (plain `docker run` without the manifest's runAsUser).
        default_user = subprocess.run(["podman", "image", "inspect", "--format", "{{.Config.User}}", image],
                                      env=podman, capture_output=True, text=True)
        assert default_user.stdout.strip() == "bentoml"

        photo = sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[0]
        for wrong in ({}, {"Authorization": "Bearer not-the-key"}):
            req = urllib.request.Request(f"{url}/classify", data=photo.read_bytes(), method="POST",
                                         headers={"Content-Type": "image/jpeg", **wrong})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(req, timeout=60)
            assert refused.value.code == 401 and refused.value.headers["WWW-Authenticate"].startswith("Bearer")
            assert "error" in json.loads(refused.value.read())
        req = urllib.request.Request(f"{url}/v2/repository/index", data=b"{}", method="POST",
                                     headers={"Authorization": f"Bearer {key}"})
        with pytest.raises(urllib.error.HTTPError) as absent:
            urllib.request.urlopen(req, timeout=10)
        assert absent.value.code == 404  # the Secret has no admin-key: the management API does not exist
        req = urllib.request.Request(f"{url}/classify?top_k=5", data=photo.read_bytes(), method="POST",
                                     headers={"Content-Type": "image/jpeg", "Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            served = json.loads(r.read())
        assert served["model"] == model.tag  # the model baked into the image, by exact version

        # The same model outside the container: same labels in the same order, same scores.
        stored = load_model(model.tag)
        session = OnnxClassifier(stored.onnx_path, "cpu")
        probs = softmax(session(model_inputs(session, [photo], stored.card.preprocessing)))[0]
        order = np.argsort(-probs)[:5]
        assert [p["label"] for p in served["predictions"]] == [stored.card.labels[i] for i in order]
        np.testing.assert_allclose([p["score"] for p in served["predictions"]], probs[order], atol=1e-4)

        # Through the Open Inference Protocol with NVIDIA's client, as KServe's users reach it (deploy/kserve):
        # the same answer, and the v2 probes the InferenceService uses.
        import tritonclient.http as triton

        v2 = triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
        assert v2.is_server_ready() and v2.is_model_ready(model.name, headers={"Authorization": f"Bearer {key}"})
        tensor = triton.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([photo.read_bytes()], dtype=np.object_))
        v2_probs = v2.infer(model.name, [tensor], headers={"Authorization": f"Bearer {key}"}).as_numpy("probabilities")[0]
        np.testing.assert_allclose(v2_probs[order], probs[order], atol=1e-4)
        v2.close()
        import tritonclient.grpc as triton_grpc  # and over gRPC, on the port the manifests name

        v2 = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        tensor = triton_grpc.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([photo.read_bytes()], dtype=np.object_))
        grpc_probs = v2.infer(model.name, [tensor], headers={"authorization": f"Bearer {key}"}).as_numpy("probabilities")[0]
        np.testing.assert_allclose(grpc_probs[order], probs[order], atol=1e-4)
        v2.close()

        # The Deployment's probe and scrape paths answer on the running image, without the key.
        manifest = cs.deployment_manifest()
        (container,) = manifest["spec"]["template"]["spec"]["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            with urllib.request.urlopen(url + container[probe]["httpGet"]["path"], timeout=10) as r:
                assert r.status == 200, probe
        scrape = manifest["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
        with urllib.request.urlopen(url + scrape, timeout=10) as r:
            assert b"bentoml_service_request_total" in r.read()
    finally:
        subprocess.run(["podman", "rm", "-f", name], env=podman, capture_output=True)
        subprocess.run(["podman", "rmi", "-f", image], env=podman, capture_output=True)
        subprocess.run([sys.executable, "-m", "bentoml", "delete", "-y", bento_tag], env=env, capture_output=True)
