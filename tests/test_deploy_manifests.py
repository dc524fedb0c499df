"""deploy/kubernetes/ parses and agrees with the service and the image: ports, probes, metrics, user, image.

(tests/test_container.py starts the real image the way the Deployment does and requests its probe and
metrics paths.)"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tuneserve.service.config import ServiceConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def _container(manifests) -> dict:
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_every_manifest_is_listed_in_the_kustomization(manifests):
    listed = set(manifests["Kustomization"]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= manifests.keys()


def test_deployment_serves_bentoml_port_with_its_probes_and_one_gpu(manifests):
    c = _container(manifests)
    http, grpc = c["ports"]
    assert http["containerPort"] == 3000 and http["name"] == "http"  # BentoML's port, EXPOSEd by the image
    assert (grpc["name"], grpc["containerPort"]) == ("grpc", ServiceConfig().grpc_port)  # the service's gRPC default
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
    annotations = manifests["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == ("3000", "/metrics")


def test_pod_runs_as_the_images_non_root_user_with_a_read_only_root(manifests):
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    c = _container(manifests)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1034
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # BentoML writes under BENTOML_HOME: it must point into a writable emptyDir mount.
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert any(env["BENTOML_HOME"].startswith(m + "/") for m in mounts)


def test_service_and_autoscaler_point_at_the_deployment(manifests):
    dep, svc, hpa = manifests["Deployment"], manifests["Service"], manifests["HorizontalPodAutoscaler"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    http, grpc = svc["spec"]["ports"]
    assert http["targetPort"] == "http"
    assert (grpc["targetPort"], grpc["appProtocol"]) == ("grpc", "kubernetes.io/h2c")  # HTTP/2 without TLS
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_image_is_the_bento_that_bentofile_builds(manifests):
    bento_name = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["name"]
    image = _container(manifests)["image"]
    assert image.split(":")[0] == bento_name  # `bentoml containerize` names the image after the Bento
    (override,) = manifests["Kustomization"]["images"]
    assert override["name"] == bento_name


def test_keys_come_from_a_secret_and_the_api_key_is_required(manifests):
    env = {e["name"]: e for e in _container(manifests)["env"]}
    api = env["TUNESERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    admin = env["TUNESERVE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    assert api["name"] == admin["name"] == "tuneserve-keys"
    assert not api.get("optional", False)  # no Secret, no pod: never an open inference port by mistake
    assert admin["optional"] is True  # no admin key: the management API does not exist
    # Keys are never written into the manifests themselves.
    assert not any("KEY" in name and "value" in e for name, e in env.items())
    assert "Secret" not in manifests


def test_podman_flags_resolve_the_secret_like_kubernetes(manifests):
    import podman_image as cs

    dep = manifests["Deployment"]
    flags = cs.podman_flags_like_kubernetes(dep, {"tuneserve-keys": {"api-key": "k1"}})
    assert "--env=TUNESERVE_API_KEY=k1" in flags and not any("TUNESERVE_ADMIN_KEY" in f for f in flags)
    with pytest.raises(KeyError, match="api-key"):
        cs.podman_flags_like_kubernetes(dep, {})


def test_kserve_inference_service_runs_the_same_image_with_v2_probes(manifests):
    (isvc,) = yaml.safe_load_all((ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = isvc["spec"]["predictor"]
    (c,) = predictor["containers"]
    deployment = _container(manifests)
    assert c["image"] == deployment["image"] and c["name"] == "kserve-container"
    http, grpc = c["ports"]
    assert http["containerPort"] == 3000  # KServe routes its URL to the first port
    # Further ports get a Service port of their number, HTTP/2 (h2c) where the name holds "grpc" (KServe's rule).
    assert "grpc" in grpc["name"] and grpc["containerPort"] == ServiceConfig().grpc_port
    assert c["readinessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # The same settings, keys and hardening as the plain Deployment: the two must not drift apart.
    assert c["env"] == deployment["env"]
    assert c["resources"] == deployment["resources"] and c["securityContext"] == deployment["securityContext"]
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    assert predictor["securityContext"] == pod["securityContext"]
    assert predictor["volumes"] == pod["volumes"] and c["volumeMounts"] == deployment["volumeMounts"]
