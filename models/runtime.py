"""Running an exported model with onnxruntime: provider choice, batched inference, top-k.

Used by the export parity gate, `tuneserve evaluate` and the HTTP service. No torch here.
"""
from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")


def gpu_present() -> bool:
    """Cheap check for an NVIDIA device, so CPU machines never try (and noisily fail) to load CUDA."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or bool(glob.glob("/proc/driver/nvidia/gpus/*"))


def choose_providers(device: str = "auto") -> list[str]:
    import onnxruntime as ort

    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    want_cuda = device == "cuda" or (device == "auto" and gpu_present())
    if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        try:
            # onnxruntime-gpu finds CUDA/cuDNN from pip's nvidia-* wheels or torch's copies this way.
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001 - a failed preload only means CUDA may not load; checked below
            log.warning("onnxruntime.preload_dlls() failed (%s); CUDA may fall back to CPU", e)
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError("device='cuda' was asked for, but no NVIDIA GPU or CUDAExecutionProvider is available")
    return ["CPUExecutionProvider"]


class OnnxClassifier:
    """An onnxruntime session over an exported classifier: float32 (N,3,H,W) -> logits (N, classes)."""

    def __init__(self, onnx_path: str | os.PathLike, device: str = "auto", intra_op_threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        requested = choose_providers(device)
        self.session = ort.InferenceSession(str(Path(onnx_path)), sess_options=opts, providers=requested)
        self.providers = self.session.get_providers()
        if requested[0] != self.providers[0]:
            log.warning("asked for %s but onnxruntime runs on %s", requested[0], self.providers[0])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """batch: float32 (N, 3, H, W) -> logits float32 (N, num_classes)."""
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, labels: list[str], k: int) -> list[dict[str, float | str]]:
    """probs: (num_classes,) -> the k best as [{"label", "score"}], best first."""
    k = min(k, probs.shape[-1])
    idx = np.argsort(-probs, kind="stable")[:k]
    return [{"label": labels[i], "score": float(probs[i])} for i in idx]
