#!/usr/bin/env bash
# The peers' own venv, benchmarks/peers/.venv: LitServe and Ray Serve with the same onnxruntime-gpu, numpy
# and Pillow versions as the project venv, so the model and the image code are the same in every server
# and only the framework around them differs. A separate venv because LitServe's and Ray's dependencies
# (websockets, Ray's gRPC/OpenTelemetry set) would otherwise be added to the venv BentoML and the tests use.
# BentoML's peer runs in the project venv (BentoML is already there, at the version tuneserve serves with).
#
# Idempotent: does nothing when the venv already holds what this script installs (a stamp file records it).
#   bash benchmarks/peers/setup.sh            # LitServe + Ray Serve
#   PEERS_RAY=0 bash benchmarks/peers/setup.sh   # LitServe only
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
project_py="$root/.venv/bin/python"
venv="$here/.venv"

if [[ ! -x "$project_py" ]]; then
    echo "error: $project_py not found; create the project venv first (python3 -m venv .venv && .venv/bin/pip install -e .)" >&2
    exit 1
fi

# Same versions as the project venv: a different onnxruntime or Pillow would be a different benchmark.
# onnxruntime-gpu, never plain onnxruntime: both install the module `onnxruntime` and clobber each other;
# the GPU wheel runs on CPU too (CPUExecutionProvider) and is what the project uses.
pins=$("$project_py" - <<'EOF'
import importlib.metadata as m
print(" ".join(f"{p}=={m.version(p)}" for p in ("onnxruntime-gpu", "numpy", "pillow", "uvloop", "psutil")))
EOF
)
# On a GPU machine onnxruntime-gpu needs CUDA 13 and cuDNN 9: its [cuda,cudnn] extras bring them as pip
# wheels (the project venv has them through torch). PEERS_CUDA=1 or 0 forces the choice.
if [[ "${PEERS_CUDA:-}" == "1" || ( -z "${PEERS_CUDA:-}" && -e /dev/nvidia0 ) ]]; then
    pins="${pins/onnxruntime-gpu==/onnxruntime-gpu[cuda,cudnn]==}"
fi
wanted="litserve python-multipart $pins"
if [[ "${PEERS_RAY:-1}" != "0" ]]; then
    wanted="$wanted ray[serve]"
fi

stamp="$venv/.peers-installed"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    echo "peers venv up to date: $venv"
    exit 0
fi

[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
start=$(date +%s)
# shellcheck disable=SC2086  # word splitting intended: one requirement per word
"$venv/bin/python" -m pip install --quiet litserve python-multipart $pins
if [[ "${PEERS_RAY:-1}" != "0" ]]; then
    # Ray is optional: the comparison skips its server when `import ray` fails.
    "$venv/bin/python" -m pip install --quiet "ray[serve]" $pins || echo "warning: ray[serve] did not install; the Ray Serve peer will be skipped" >&2
fi
echo "$wanted" > "$stamp"
echo "peers venv ready in $(( $(date +%s) - start )) s: $venv ($(du -sh "$venv" | cut -f1))"
# tuneserve's preprocessing (peer 'litserve-same-pre') is imported from the source tree via PYTHONPATH,
# without torch or BentoML: check that it works in this venv.
PYTHONPATH="$root" "$venv/bin/python" -c "import tuneserve.models.preprocessing" \
    && echo "tuneserve.models.preprocessing imports in the peers venv"
"$venv/bin/python" -m pip list 2>/dev/null | grep -i -E '^(litserve|ray|onnxruntime-gpu|fastapi|uvicorn|numpy|pillow) '
