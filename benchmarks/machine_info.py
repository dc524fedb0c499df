"""What this machine is, for the results beside it: GPU, driver, torch and CUDA, onnxruntime's providers and
whether its CUDA provider actually runs a graph here (a session falls back to CPU silently where CUDA or cuDNN
cannot load), and which of the packages the checks import are missing.

    python3 benchmarks/machine_info.py --out OUT/machine.json
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from results_io import write_result

# What the GPU check imports, beyond the standard library: a missing one explains a failed step.
PACKAGES = ("numpy", "PIL", "torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "bentoml", "httpx", "timm",
            "safetensors", "yaml", "tqdm", "matplotlib", "prometheus_client", "uvloop", "httptools",
            "nvidia.nvimgcodec", "cvcuda")


def nvidia_smi() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None


def torch_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(),
                    cudnn=torch.backends.cudnn.version())
    return info


def onnxruntime_info() -> dict[str, Any]:
    """Providers listed, and the provider a one-node graph's session really runs on (with torch imported first,
    as the service does: its CUDA and cuDNN libraries are what onnxruntime's CUDA provider loads)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from tuneserve.models.runtime import choose_providers

    info: dict[str, Any] = {"version": ort.__version__, "available": ort.get_available_providers()}
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
        try:
            session = ort.InferenceSession(str(path), providers=choose_providers("auto"))
            info["session_runs_on"] = session.get_providers()[0]
        except Exception as e:  # noqa: BLE001 - recorded: the reason a CUDA step will fall back or fail
            info["session_error"] = f"{type(e).__name__}: {e}"
    return info


def missing_packages() -> dict[str, str]:
    missing = {}
    for name in PACKAGES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - ImportError, or a package that fails while importing
            missing[name] = f"{type(e).__name__}: {e}"[:200]
    return missing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    gpu = nvidia_smi()
    fields: dict[str, Any] = {"gpu": gpu, "cpus": os.cpu_count(), "python": platform.python_version(),
                              "platform": platform.platform()}
    for key, probe in (("torch", torch_info), ("onnxruntime", onnxruntime_info), ("missing", missing_packages)):
        try:
            fields[key] = probe()
        except Exception as e:  # noqa: BLE001 - one failed probe does not hide the others
            fields[key] = {"error": f"{type(e).__name__}: {e}"}
    fields["machine"] = f"{platform.node()}: {os.cpu_count()} CPUs, {gpu or 'no GPU'}"
    for k, v in fields.items():
        print(f"{k}: {v}")
    write_result(args.out, **fields)


if __name__ == "__main__":
    main()
