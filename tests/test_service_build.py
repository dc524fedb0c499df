"""`bentoml build` with the repository's bentofile.yaml works offline and packs the model (by exact version;
its ONNX files are in the store), a Dockerfile on the CUDA base and torch-free requirements, from the lean
template."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import bentoml
import pytest

from support import builtin_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def bentoml_cli(*args: str, env: dict[str, str]) -> str:
    r = subprocess.run([sys.executable, "-m", "bentoml", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"bentoml {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def test_bentoml_build_offline(tmp_path):
    model = builtin_model()
    # No index, no network: lock_packages is off, so nothing may need one.
    env = {**os.environ, "TUNESERVE_MODEL": model.tag, "PIP_NO_INDEX": "1", "UV_OFFLINE": "1",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    out = bentoml_cli("build", "--output", "tag", env=env)
    tag = next(line.split("__tag__:")[1].strip() for line in out.splitlines() if "__tag__:" in line)
    assert tag.startswith("tuneserve:")

    # The Bento's folder in this session's BentoML home (conftest) is what `bentoml export` archives and
    # `bentoml containerize` builds from; reading it directly saves the 40 s the 64 MB archive takes to write.
    built = bentoml.bentos.get(tag)
    bento = Path(built.path)
    names = {f"./{p.relative_to(bento)}" for p in bento.rglob("*") if p.is_file()}
    # The model goes in by exact version; `bentoml export` and `containerize` copy it from the store (the
    # container test serves it from the image).
    assert [str(m.tag) for m in built.info.all_models] == [model.tag]
    assert {"model.onnx", "tuneserve.json"} <= {p.name for p in Path(bentoml.models.get(model.tag).path).iterdir()}
    assert {"./src/tuneserve/__init__.py", "./src/service/service.py", "./src/models/preprocessing.py"} <= names
    # Every module of the service, subpackages included: the image imports them from the Bento's source.
    assert {f"./src/{p.relative_to(ROOT)}" for p in (ROOT / "service").rglob("*.py")} <= names
    assert not any(n.startswith(("./src/tests", "./src/training", "./src/runs", "./src/.venv")) for n in names)
    assert "./src/tuneserve/cli.py" not in names  # the CLI is not part of the image
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04" in dockerfile
    assert f"TUNESERVE_MODELS={model.tag}" in dockerfile  # the image serves exactly the packed version
    # ... set after the packages are installed: an image of another model version reuses that layer.
    assert dockerfile.index("env/python/install.sh") < dockerfile.index("ARG TUNESERVE_MODELS=")
    assert dockerfile.count("ARG TUNESERVE_MODELS=") == 1 and "ARG BENTOML_DO_NOT_TRACK=True" in dockerfile
    assert "uv venv -p 3.11" in dockerfile and "USER bentoml" in dockerfile  # uv's Python 3.11, run as non-root
    assert "build-essential" not in dockerfile and " git" not in dockerfile  # deploy/Dockerfile.template's lean base
    assert "onnxruntime-gpu==1.31.*" in requirements and "bentoml==" in requirements
    assert "torch" not in requirements
    # The Bento's own files, not this checkout's, are what `tuneserve.service` imports from its folder.
    src = bento / "src"
    code = ("import tuneserve.service.config as c, tuneserve.models.preprocessing as p; "
            "print(c.__file__); print(p.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert all(Path(f).resolve().is_relative_to(src.resolve()) for f in r.stdout.split()), r.stdout
