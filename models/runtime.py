"""Running an exported model with onnxruntime: provider choice, batched inference, top-k.

Used by the export parity gate, `tuneserve evaluate` and the HTTP service. No torch here.
"""
from __future__ import annotations

import glob
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from tuneserve.models.explain import CAM_OUTPUT
from tuneserve.models.preprocessing import Preprocessing, normalise

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")


def gpu_present() -> bool:
    """Cheap check for an NVIDIA device, so CPU machines never try (and noisily fail) to load CUDA."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or bool(glob.glob("/proc/driver/nvidia/gpus/*"))


# onnxruntime CUDA options, each chosen because it pays for CNN inference at fixed input shapes:
CUDA_OPTIONS = {
    "prefer_nhwc": "1",  # channels-last convolutions: the layout tensor cores want (+~15% on ResNet-50, H100)
    "cudnn_conv_algo_search": "EXHAUSTIVE",  # best kernel per shape, found once per bucket at warm-up
    "cudnn_conv_use_max_workspace": "1",  # let cuDNN use the faster, workspace-hungry algorithms
    "do_copy_in_default_stream": "1",  # copies ordered with compute: no extra synchronisation
}


def choose_providers(device: str = "auto", cuda_options: dict[str, str] | None = None) -> list:
    """Providers for a session on `device`: CUDA (with CUDA_OPTIONS, updated by `cuda_options`) then CPU,
    or CPU alone."""
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
        return [("CUDAExecutionProvider", {**CUDA_OPTIONS, **(cuda_options or {})}), "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError("device='cuda' was asked for, but no NVIDIA GPU or CUDAExecutionProvider is available")
    return ["CPUExecutionProvider"]


def bucket_sizes(max_batch: int) -> list[int]:
    """Powers of two up to max_batch, and max_batch itself: the only batch shapes a bucketed session runs."""
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return sizes + [max_batch]


PIXELS_TYPE = "tensor(uint8)"  # the input type of graphs that normalise themselves (training/export.py)


class OnnxClassifier:
    """An onnxruntime session over an exported classifier: images -> logits float32 (N, classes).

    The images are what the graph's input says: uint8 pixels (N, S, S, 3) for graphs exported with their
    normalisation inside (`takes_pixels`), float32 normalised (N, 3, S, S) for graphs exported before that;
    `inputs(pixels, pp)` makes either from pixels.

    `buckets`: pad every batch up to the next of bucket_sizes(max_batch) (larger batches run in chunks of
    max_batch), so the session sees a handful of shapes: cuDNN searches algorithms once per shape, and each
    shape gets a pre-allocated input buffer. `io_binding`: copy the batch into that buffer on the session's
    device and run with an IO binding, instead of letting onnxruntime allocate and copy per call.
    Both default to on for CUDA and off for CPU, where neither pays; both work on either (the tests use CPU).
    Graphs exported with class activation maps (a second output, CAM_OUTPUT: float32 (N, classes, h, w)) can
    `explain(batch)`; calling the classifier asks onnxruntime for the logits alone (`can_explain` says which).
    `spin`: onnxruntime's idle intra-op threads busy-wait (its default, best for the model alone); off, they
    sleep, which serving on CPU wants.
    """

    def __init__(self, onnx_path: str | os.PathLike, device: str = "auto", intra_op_threads: int = 0,
                 buckets: bool | None = None, io_binding: bool | None = None, max_batch: int = 128,
                 cuda_options: dict[str, str] | None = None, spin: bool = True):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        if not spin:
            # Idle intra-op threads sleep instead of busy-waiting for the next call: on a CPU shared with
            # image decoding, spinning threads take the cores the decoders need (docs/benchmarks.md).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        requested = choose_providers(device, cuda_options)
        self.session = ort.InferenceSession(str(Path(onnx_path)), sess_options=opts, providers=requested)
        self.providers = self.session.get_providers()
        wanted = requested[0][0] if isinstance(requested[0], tuple) else requested[0]
        if wanted != self.providers[0]:
            if device == "cuda":  # asked for explicitly: running on the CPU instead would be a silent surprise
                raise RuntimeError(f"device 'cuda' was asked for, but onnxruntime could not start {wanted} (it "
                                   f"runs on {self.providers[0]}; its log above says why: CUDA 13 and cuDNN 9 "
                                   "libraries and a driver are needed)")
            log.warning("asked for %s but onnxruntime runs on %s", wanted, self.providers[0])
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.takes_pixels = graph_input.type == PIXELS_TYPE
        self.input_dtype = np.dtype(np.uint8 if self.takes_pixels else np.float32)
        self.output_name = self.session.get_outputs()[0].name
        outputs = {o.name for o in self.session.get_outputs()}
        self.explain_output = CAM_OUTPUT if CAM_OUTPUT in outputs else None  # None: exported before CAMs
        on_cuda = self.device == "cuda"
        self.buckets = bucket_sizes(max_batch) if (on_cuda if buckets is None else buckets) else None
        self.io_binding = on_cuda if io_binding is None else io_binding
        # input shape -> {output names: (IOBinding, input OrtValue)}
        self._bound: dict[tuple[int, ...], dict[tuple[str, ...], tuple[Any, Any]]] = {}
        self._bind_lock = threading.Lock()  # one binding per shape: concurrent calls of a shape take turns

    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def input_shape(self, n: int, size: int) -> tuple[int, ...]:
        """The shape of a batch of `n` images of side `size` as this graph takes it."""
        return (n, size, size, 3) if self.takes_pixels else (n, 3, size, size)

    def inputs(self, pixels: np.ndarray, pp: Preprocessing) -> np.ndarray:
        """uint8 pixels (N, S, S, 3) -> this graph's input: the pixels themselves, or normalised float32
        (N, 3, S, S) by `pp` for graphs that take that."""
        return pixels if self.takes_pixels else normalise(pixels, pp)

    @property
    def can_explain(self) -> bool:
        """Whether the graph has the class activation map output (models exported before it do not)."""
        return self.explain_output is not None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """batch: this graph's input (uint8 (N, S, S, 3) or float32 (N, 3, S, S)) -> logits float32 (N, classes)."""
        return self._forward(batch, (self.output_name,))[0]

    def explain(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """batch as for a call -> (logits float32 (N, classes), cams float32 (N, classes, h, w)), from one run:
        each class's logit at every location of the network's last feature grid (models/explain.py draws them)."""
        if self.explain_output is None:
            raise ValueError("this model's graph has no class activation map output (it was exported before "
                             "tuneserve added one): re-export it (tuneserve export RUN_DIR) to explain its answers")
        logits, cams = self._forward(batch, (self.output_name, self.explain_output))
        return logits, cams

    def _forward(self, batch: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
        if self.takes_pixels != (batch.dtype == np.uint8):
            wanted = "uint8 pixels (N, S, S, 3)" if self.takes_pixels else "normalised float32 (N, 3, S, S)"
            raise ValueError(f"this model takes {wanted}, got a {batch.dtype} array of shape {batch.shape} "
                             "(OnnxClassifier.inputs makes the model's input from pixels)")
        batch = np.ascontiguousarray(batch, dtype=self.input_dtype)
        if self.buckets is None:
            return self._run(batch, names)
        n, largest = batch.shape[0], self.buckets[-1]
        if n > largest:
            parts = [self._forward(batch[i:i + largest], names) for i in range(0, n, largest)]
            return [np.concatenate(chunks) for chunks in zip(*parts)]
        size = next(b for b in self.buckets if b >= n)
        if size > n:  # zero rows: every row is computed independently (eval-mode BatchNorm), then dropped
            batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), batch.dtype)])
        return [out[:n] for out in self._run(batch, names)]

    def _run(self, batch: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
        """Only the outputs in `names` are fetched: classifying never copies the CAMs off the device."""
        if not self.io_binding:
            return self.session.run(list(names), {self.input_name: batch})
        with self._bind_lock:
            binding, buffer = self._binding(batch.shape, names)
            buffer.update_inplace(batch)  # host -> device copy into the buffer the graph reads
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()

    def _binding(self, shape: tuple[int, ...], names: tuple[str, ...]) -> tuple[Any, Any]:
        """The binding and input buffer for `shape` and outputs `names`: kept per bucket; made per call without
        buckets, where shapes are unbounded."""
        if names in self._bound.get(shape, {}):
            return self._bound[shape][names]
        import onnxruntime as ort

        buffer = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self.input_dtype, self.device, 0)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, buffer)
        for name in names:  # onnxruntime allocates the outputs on the device
            binding.bind_output(name, self.device)
        if self.buckets is not None:
            self._bound.setdefault(shape, {})[names] = (binding, buffer)
        return binding, buffer


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, labels: list[str], k: int) -> list[dict[str, float | str]]:
    """probs: (num_classes,) -> the k best as [{"label", "score"}], best first."""
    k = min(k, probs.shape[-1])
    idx = np.argsort(-probs, kind="stable")[:k]
    return [{"label": labels[i], "score": float(probs[i])} for i in idx]
