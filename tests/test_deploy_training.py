"""deploy/training/: the PyTorchJob is one the Kubeflow training operator accepts, and the command it runs in each
pod is one torchrun and `tuneserve train` accept, with ranks, volumes and the model store where they belong.

The job is read by the Kubeflow training SDK's own models (kubeflow-training: the PyTorchJob CRD's OpenAPI
types, with Kubernetes' pod types inside); the operator's admission rules and the environment it gives each
pod are those of training-operator v1.9 (pkg/webhooks/pytorch/pytorchjob_webhook.go and
pkg/controller.v1/pytorch/envvar.go). No cluster is needed."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ROOT / "deploy" / "training"


@pytest.fixture(scope="module")
def job() -> dict:
    (doc,) = yaml.safe_load_all((TRAINING / "pytorchjob.yaml").read_text())
    return doc


@pytest.fixture(scope="module")
def claims() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all((TRAINING / "storage.yaml").read_text())}


def _replicas(job: dict) -> dict[str, dict]:
    return job["spec"]["pytorchReplicaSpecs"]


def _container(replica: dict) -> dict:
    from kubeflow.training.constants.constants import PYTORCHJOB_CONTAINER

    (c,) = [c for c in replica["template"]["spec"]["containers"] if c["name"] == PYTORCHJOB_CONTAINER]
    return c


def _nodes_and_gpus(job: dict) -> tuple[int, int]:
    return sum(r["replicas"] for r in _replicas(job).values()), int(job["spec"]["nprocPerNode"])


def _round_trip(doc: dict, model: str, api_client) -> dict:
    """`doc` read into the SDK's `model` and written back. The generated models keep only the fields their
    OpenAPI types declare, and refuse a missing required one, so any unknown, misspelled or misplaced key
    (at any depth, pod spec included) makes the result differ from `doc`."""
    obj = api_client.deserialize(SimpleNamespace(data=json.dumps(doc)), model)
    assert type(obj).__name__ == model
    return api_client.sanitize_for_serialization(obj)


def test_job_is_a_pytorchjob_the_kubeflow_sdk_reads_field_for_field(job):
    from kubeflow.training import ApiClient
    from kubeflow.training.constants import constants

    assert (job["apiVersion"], job["kind"]) == (constants.API_VERSION, constants.PYTORCHJOB_KIND)
    assert _round_trip(job, constants.PYTORCHJOB_MODEL, ApiClient()) == job


def test_claims_are_persistent_volume_claims_kubernetes_reads_field_for_field(claims):
    from kubernetes.client import ApiClient

    for claim in claims.values():
        assert (claim["apiVersion"], claim["kind"]) == ("v1", "PersistentVolumeClaim")
        assert _round_trip(claim, "V1PersistentVolumeClaim", ApiClient()) == claim
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every node's pod mounts both at once


def test_a_misspelled_field_fails_the_round_trip(job):
    """The check above has teeth: a key the CRD does not declare disappears on the way through the SDK."""
    from kubeflow.training import ApiClient
    from kubeflow.training.constants import constants

    bad = json.loads(json.dumps(job))
    bad["spec"]["nprocsPerNode"] = bad["spec"].pop("nprocPerNode")
    assert _round_trip(bad, constants.PYTORCHJOB_MODEL, ApiClient()) != bad
    bad = json.loads(json.dumps(job))
    _container(_replicas(bad)["Worker"])["volumeMount"] = _container(_replicas(bad)["Worker"]).pop("volumeMounts")
    assert _round_trip(bad, constants.PYTORCHJOB_MODEL, ApiClient()) != bad


def test_job_passes_the_operators_admission_rules(job):
    """training-operator v1.9's validating webhook: a DNS-1035 name; only Master and Worker replicas; exactly
    one Master; every replica has a container named `pytorch` with an image. And the Master's container
    declares the port the operator turns into MASTER_PORT / PET_MASTER_PORT (port named `pytorchjob-port`)."""
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", job["metadata"]["name"])
    replicas = _replicas(job)
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    for r in replicas.values():
        assert _container(r)["image"]
        assert r["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
    ports = {p["name"]: p["containerPort"] for p in _container(replicas["Master"]).get("ports", [])}
    assert "pytorchjob-port" in ports
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] in ("All", "Running", "None")


def test_master_and_worker_pods_are_the_same(job):
    master, worker = _replicas(job)["Master"], _replicas(job)["Worker"]
    assert master["template"] == worker["template"]
    assert master["restartPolicy"] == worker["restartPolicy"]


def _operator_env(job: dict, replica_type: str, index: int) -> dict[str, str]:
    """The variables training-operator v1.9 adds to the `pytorch` container of pod `<job>-<type>-<index>`
    (envvar.go: setPodEnv, without elasticPolicy; master.go)."""
    nodes, nproc = _nodes_and_gpus(job)
    node_rank = index + (1 if replica_type == "Worker" else 0)
    port = next(p["containerPort"] for p in _container(_replicas(job)["Master"])["ports"] if p["name"] == "pytorchjob-port")
    master = f"{job['metadata']['name']}-master-0"
    return {"PYTHONUNBUFFERED": "1", "MASTER_PORT": str(port), "PET_MASTER_PORT": str(port), "MASTER_ADDR": master,
            "PET_MASTER_ADDR": master, "WORLD_SIZE": str(nodes * nproc), "RANK": str(node_rank),
            "PET_NODE_RANK": str(node_rank), "PET_NPROC_PER_NODE": str(nproc), "PET_NNODES": str(nodes)}


def _launch(job: dict, replica_type: str, index: int, monkeypatch):
    """What torchrun makes of the container's command in that pod: (LaunchConfig, program, its arguments)."""
    from torch.distributed.run import config_from_args, get_args_parser

    c = _container(_replicas(job)[replica_type])
    env = {e["name"]: e["value"] for e in c.get("env", [])} | _operator_env(job, replica_type, index)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert c["command"] == ["torchrun"]
    args = get_args_parser().parse_args(c["args"])  # the PET_* defaults are read when the parser is built
    return config_from_args(args)


@pytest.mark.parametrize("replica_type, index", [("Master", 0), ("Worker", 0)])
def test_torchrun_in_each_pod_joins_one_static_group_of_n_nodes_by_m_gpus(job, replica_type, index, monkeypatch):
    config, program, program_args = _launch(job, replica_type, index, monkeypatch)
    nodes, nproc = _nodes_and_gpus(job)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (nodes, nodes, nproc)
    # Static rendezvous at the Master pod's service: node rank = pod rank, so global rank 0 (the one that
    # writes the run folder and registers the model) is the Master's first process.
    assert config.rdzv_backend == "static"
    assert config.rdzv_endpoint == f"{job['metadata']['name']}-master-0:23456"
    assert config.rdzv_configs["rank"] == (0 if replica_type == "Master" else index + 1)
    assert program_args[:4] == ["-u", "-m", "tuneserve", "train"]
    # One process per GPU the pod gets.
    resources = _container(_replicas(job)[replica_type])["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == int(resources["requests"]["nvidia.com/gpu"]) == nproc
    assert int(resources["requests"]["cpu"]) == nproc * int(dict(
        (e["name"], e["value"]) for e in _container(_replicas(job)[replica_type])["env"])["OMP_NUM_THREADS"])


def _train_config(job: dict):
    from tuneserve.parsers import build_parser
    from tuneserve.training.config import TrainConfig, make_config

    args = _container(_replicas(job)["Master"])["args"]
    assert args[:3] == ["-m", "tuneserve", "train"]
    parsed = build_parser().parse_args(args[2:])
    assert isinstance(parsed, argparse.Namespace) and parsed.gpus is None  # torchrun starts the ranks, not --gpus
    return make_config(parsed.config, **{f.name: getattr(parsed, f.name) for f in dataclasses.fields(TrainConfig)})


def _mounts(job: dict) -> dict[str, dict]:
    """mount path -> {"readOnly": bool, and the pod volume's source}."""
    spec = _replicas(job)["Master"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: {"readOnly": m.get("readOnly", False), **volumes[m["name"]]}
            for m in _container(_replicas(job)["Master"])["volumeMounts"]}


def _mount_of(path: str, mounts: dict[str, dict]) -> dict:
    (best,) = [m for p, m in mounts.items() if path == p or path.startswith(p.rstrip("/") + "/")]
    return best


def test_tuneserve_train_reads_photos_read_only_and_writes_runs_and_models_to_the_shared_claim(job, claims):
    cfg = _train_config(job)
    mounts = _mounts(job)
    env = {e["name"]: e["value"] for e in _container(_replicas(job)["Master"])["env"]}
    photos = _mount_of(cfg.data, mounts)
    assert photos["readOnly"] and photos["persistentVolumeClaim"]["readOnly"] is True
    work = _mount_of(cfg.output_dir, mounts)
    assert not work["readOnly"] and work["persistentVolumeClaim"]["claimName"] in claims
    # The model store beside the runs, on the same claim: rank 0's save is staged inside BENTOML_HOME and
    # made visible by one rename (models/store.py), which stays atomic on one shared filesystem.
    assert _mount_of(env["BENTOML_HOME"], mounts) is work
    assert _mount_of(env["TORCH_HOME"], mounts) is work
    assert photos["persistentVolumeClaim"]["claimName"] in claims
    # The decoded-image cache is per node (local rank 0 builds it), on the pod's own disk.
    assert "emptyDir" in _mount_of(cfg.cache_dir, mounts)
    assert cfg.device == "cuda" and cfg.pipeline == "auto"  # auto: the cache pipeline on CUDA
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    # The root filesystem is read-only: everything written lands on a mount.
    assert _container(_replicas(job)["Master"])["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in _mount_of(env["HOME"], mounts)


def test_learning_rate_follows_the_square_root_rule_for_the_jobs_batch(job):
    """The manifest's lr is the default's x sqrt(k), k = how many times one process's batch the job's
    effective batch is (docs/training.md): changing N or M without the lr fails here."""
    from tuneserve.training.config import TrainConfig

    cfg, default = _train_config(job), TrainConfig()
    nodes, nproc = _nodes_and_gpus(job)
    k = nodes * nproc * cfg.batch_size * cfg.grad_accum_steps / (default.batch_size * default.grad_accum_steps)
    assert cfg.lr == pytest.approx(default.lr * math.sqrt(k))


def test_image_is_the_training_image_the_kustomization_sets(job):
    (kustomization,) = yaml.safe_load_all((TRAINING / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["pytorchjob.yaml"]  # storage.yaml is applied once, never deleted with -k
    (override,) = kustomization["images"]
    for r in _replicas(job).values():
        assert _container(r)["image"].split(":")[0] == override["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="renders with kubectl's built-in kustomize")
def test_kustomize_sets_the_image_inside_the_pytorchjob(tmp_path):
    """kustomize's image override reaches containers in a custom resource (the PyTorchJob's replica pods)."""
    shutil.copytree(TRAINING, tmp_path / "training")
    k = tmp_path / "training" / "kustomization.yaml"
    doc = yaml.safe_load(k.read_text())
    doc["images"] = [{"name": "tuneserve-train", "newName": "registry.example.com/team/tuneserve-train", "newTag": "0.1.0"}]
    k.write_text(yaml.safe_dump(doc))
    rendered = subprocess.run(["kubectl", "kustomize", str(k.parent)], capture_output=True, text=True, timeout=60, check=True)
    (job,) = yaml.safe_load_all(rendered.stdout)
    assert {_container(r)["image"] for r in _replicas(job).values()} == {"registry.example.com/team/tuneserve-train:0.1.0"}


def test_dockerfile_installs_every_package_folder_and_runs_as_the_pods_user(job):
    import tomllib  # Python 3.11+, like TOML training configs

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    dockerfile = (TRAINING / "Dockerfile").read_text()
    copied = {m.group(1) for m in re.finditer(r"^COPY (\w+)/ /src/\1/$", dockerfile, re.M)}
    assert copied == folders
    assert re.search(r"^COPY pyproject\.toml README\.md /src/$", dockerfile, re.M)
    assert pyproject["project"]["readme"] == "README.md"  # the build reads it
    (user,) = re.findall(r"^USER (\d+)$", dockerfile, re.M)
    assert _replicas(job)["Master"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user)


def test_the_package_the_image_installs_holds_every_source_package():
    """The image installs what pyproject.toml builds, whose `packages` are listed one by one (package-dir maps
    folders to names, which setuptools cannot discover): a folder with an __init__.py that is not listed would
    be missing from the installed tuneserve, while a source checkout (tuneserve/__init__.py's finder) has it."""
    import tomllib  # Python 3.11+, like TOML training configs

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {f"{name}.{'.'.join(init.parent.relative_to(ROOT / folder).parts)}".rstrip(".")
               for name, folder in setuptools["package-dir"].items() for init in (ROOT / folder).rglob("__init__.py")}
    assert on_disk - set(setuptools["packages"]) == set()
