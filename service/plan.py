"""What a service process serves and how: resolved once from a ServiceConfig into one frozen object.

The settings say what was asked (`auto` device, batching left to its default); the plan says what that
means on this machine (CUDA or CPU, batch bound, latency bound, worker and thread counts) for one
registered model. The BentoML service makes it once, at import (its decorator needs the worker count);
tests and benchmarks make their own from a ServiceConfig, without touching the environment.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuneserve.models.architectures import BUILTIN_NAME
from tuneserve.models.artifact import FP16_ONNX_FILE, ONNX_FILE
from tuneserve.models.precision import choose_precision
from tuneserve.models.runtime import gpu_present
from tuneserve.models.store import ModelIntegrityError, ModelNotFoundError, StoredModel, load_model, verify
from tuneserve.service.config import ServiceConfig


class ModelUnusable(RuntimeError):
    """The chosen model cannot be served: a damaged file, or a graph onnxruntime cannot load."""


@dataclass(frozen=True)
class ServingPlan:
    config: ServiceConfig
    model: StoredModel
    device: str  # "cpu" or "cuda": where onnxruntime will run
    precision: str  # "fp32" or "fp16": which of the model's graphs runs
    max_batch_size: int  # most images per inference call; 1: batching off
    max_latency_ms: int  # images that waited longer for the engine are shed (503)
    workers: int  # worker processes, each with its own session and batcher
    preprocess_threads: int  # decode/preprocess threads per worker
    ort_threads: int  # onnxruntime intra-op threads (0: onnxruntime's default)

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1

    @property
    def onnx_path(self) -> Path:
        return self.model.path / (FP16_ONNX_FILE if self.precision == "fp16" else ONNX_FILE)

    def check(self) -> None:
        """What is served is whole and loads: the graph's file against its registered sha256, then an
        onnxruntime session on the CPU (what a truncated or damaged graph fails). Run before anything is
        announced, so that a bad model is one readable error instead of workers that fail at start-up."""
        from tuneserve.models.runtime import OnnxClassifier

        try:
            verify(self.model, files=(ONNX_FILE, FP16_ONNX_FILE))
        except ModelIntegrityError as e:
            raise ModelUnusable(f"cannot serve {e}") from None
        try:
            OnnxClassifier(self.onnx_path, device="cpu", intra_op_threads=1)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; each becomes one message
            raise ModelUnusable(f"cannot serve {self.model.tag}: onnxruntime cannot load {self.onnx_path.name}: "
                                f"{e}") from None

    @classmethod
    def resolve(cls, config: ServiceConfig) -> "ServingPlan":
        """The plan for `config` on this machine. The model must be registered: the service only loads tags
        (the built-in model is registered by the CLI: `tuneserve models add-builtin`, `serve` or `demo`)."""
        device = expected_device(config.device)
        max_batch_size, max_latency_ms = config.batching(device)
        workers = config.worker_count(device)
        model = resolve_model(config.model)
        precision = choose_precision(config.precision, device, model.card.variants)
        return cls(config=config, model=model, device=device, precision=precision, max_batch_size=max_batch_size,
                   max_latency_ms=max_latency_ms, workers=workers, preprocess_threads=config.threads(workers),
                   ort_threads=config.onnxruntime_threads(device, workers))


def resolve_model(tag: str | None) -> StoredModel:
    """`tag`, or the built-in model when None; ModelNotFoundError says how to register what is missing."""
    if tag:
        return load_model(tag)
    try:
        return load_model(BUILTIN_NAME)
    except ModelNotFoundError:
        raise ModelNotFoundError(
            f"no model chosen (TUNESERVE_MODEL) and the built-in model {BUILTIN_NAME} is not registered: run "
            "`tuneserve models add-builtin` once, or choose a model with TUNESERVE_MODEL=<name or name:version>"
        ) from None


def expected_device(device: str) -> str:
    """Where OnnxClassifier will run for `device` ("auto", "cuda", "cpu"), known before it exists: the
    batching limits and the worker count depend on it."""
    import onnxruntime as ort

    if device == "cpu":
        return "cpu"
    usable = "CUDAExecutionProvider" in ort.get_available_providers()
    return "cuda" if device == "cuda" or (usable and gpu_present()) else "cpu"
