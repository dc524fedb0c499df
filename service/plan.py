"""What a service process serves and how: resolved once from a ServiceConfig into one frozen object.

The settings say what was asked (`auto` device, batching left to its default, models by name); the plan
says what that means on this machine (CUDA or CPU, batch bound, latency bound, worker and thread counts)
and which registered versions it starts with. It is resolved once per server: by `tuneserve serve`, or by
BentoML's main process when started with `bentoml serve`, and handed to the worker processes in
TUNESERVE_PLAN (`to_env` / `from_env`), so that every worker serves exactly the versions and settings that
were checked. Tests and benchmarks make their own from a ServiceConfig. Versions loaded later
(service/engine/versions.py) get their ModelChoice from `plan.choose`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneserve.models.architectures import BUILTIN_NAME
from tuneserve.models.artifact import EXPLAIN_ONNX_FILE, ONNX_FILE, VARIANT_FILES
from tuneserve.models.precision import choose_precision
from tuneserve.models.runtime import gpu_present
from tuneserve.models.store import (
    ModelIntegrityError,
    ModelNotFoundError,
    StoredModel,
    list_models,
    load_model,
    verify,
)
from tuneserve.service.config import ServiceConfig

log = logging.getLogger("tuneserve.service")


PLAN_ENV = "TUNESERVE_PLAN"  # the resolved plan, JSON, from the process that resolved it to the workers


class ModelUnusable(RuntimeError):
    """The chosen model cannot be served: a damaged file, or a graph onnxruntime cannot load."""


@dataclass(frozen=True)
class ModelChoice:
    """One registered version and the precision it runs in here."""

    stored: StoredModel
    precision: str  # "fp32", "fp16" or "int8": which of the version's graphs runs

    @property
    def name(self) -> str:
        return self.stored.name

    @property
    def tag(self) -> str:
        return self.stored.tag

    @property
    def onnx_path(self) -> Path:
        return self.stored.path / VARIANT_FILES.get(self.precision, ONNX_FILE)

    def check(self) -> None:
        """What is served is whole and loads: the graphs' files against their registered sha256, then an
        onnxruntime session on the CPU (what a truncated or damaged graph fails). Run before anything is
        announced, so that a bad model is one readable error instead of workers that fail at start-up."""
        from tuneserve.models.runtime import OnnxClassifier

        try:
            verify(self.stored, files=(ONNX_FILE, EXPLAIN_ONNX_FILE, *VARIANT_FILES.values()))
        except ModelIntegrityError as e:
            raise ModelUnusable(f"cannot serve {e}") from None
        try:
            OnnxClassifier(self.onnx_path, device="cpu", intra_op_threads=1)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; each becomes one message
            raise ModelUnusable(f"cannot serve {self.tag}: onnxruntime cannot load {self.onnx_path.name}: {e}") from None


@dataclass(frozen=True)
class ServingPlan:
    config: ServiceConfig
    models: tuple[ModelChoice, ...]  # the versions served at start, in the order asked for
    default: str  # name of the model the unnamed routes serve
    device: str  # "cpu" or "cuda": where onnxruntime will run
    device_reason: str  # why: a CUDA session that ran the model, or what kept it on the CPU (GET /model, the log)
    max_batch_size: int  # most images per inference call; 1: batching off
    max_latency_ms: int  # every request is answered within this, or refused
    workers: int  # worker processes, each with its own sessions and batchers
    preprocess_threads: int  # decode/preprocess threads per worker, shared by its models
    ort_threads: int  # onnxruntime intra-op threads per session (0: onnxruntime's default)

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1

    @property
    def model(self) -> ModelChoice:
        """The default model's starting version."""
        return next(m for m in self.models if m.name == self.default)

    def choose(self, stored: StoredModel) -> ModelChoice:
        """How `stored` runs under this plan (its precision on this device)."""
        return ModelChoice(stored, choose_precision(self.config.precision, self.device, stored.card.variants))

    def check(self) -> None:
        for m in self.models:
            m.check()

    def to_env(self) -> dict[str, str]:
        """The plan for the worker processes (with the config's own TUNESERVE_* variables)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("config", "models")}
        plan = {**fields, "models": [[m.tag, m.precision] for m in self.models]}
        return {**self.config.to_env(), PLAN_ENV: json.dumps(plan)}

    @classmethod
    def from_env(cls, config: ServiceConfig, environ: dict[str, str] | None = None) -> "ServingPlan | None":
        """The plan that `to_env` handed over, or None when there is none (then: `resolve`)."""
        raw = (environ if environ is not None else os.environ).get(PLAN_ENV)
        if not raw:
            return None
        plan = json.loads(raw)
        models = tuple(ModelChoice(load_model(tag), precision) for tag, precision in plan.pop("models"))
        return cls(config=config, models=models, **plan)

    @classmethod
    def resolve(cls, config: ServiceConfig) -> "ServingPlan":
        """The plan for `config` on this machine. The models must be registered: the service only loads
        tags (the built-in model is registered by the CLI: `tuneserve models add-builtin`, `serve` or `demo`)."""
        stored = resolve_models(config.model_tags())
        device, device_reason = probe_device(config.device, stored[0])
        max_batch_size, max_latency_ms = config.batching(device)
        workers = config.worker_count(device)
        default = config.default_model or stored[0].name
        if default not in {s.name for s in stored}:
            raise ValueError(f"TUNESERVE_DEFAULT_MODEL={default!r} is not among the served models: "
                             f"{', '.join(s.name for s in stored)}")
        models = tuple(ModelChoice(s, choose_precision(config.precision, device, s.card.variants)) for s in stored)
        return cls(config=config, models=models, default=default, device=device, device_reason=device_reason,
                   max_batch_size=max_batch_size,
                   max_latency_ms=max_latency_ms, workers=workers, preprocess_threads=config.threads(workers),
                   ort_threads=config.onnxruntime_threads(device, workers))


def resolve_models(tags: list[str]) -> list[StoredModel]:
    """The versions `tags` name (see ServiceConfig.models), one per model name; ModelNotFoundError says how to
    register what is missing."""
    if not tags:
        return [resolve_model(None)]
    if tags == ["all"]:
        newest: dict[str, StoredModel] = {}
        for m in list_models():  # newest first
            newest.setdefault(m.name, m)
        if not newest:
            raise ModelNotFoundError("TUNESERVE_MODELS=all, but the store holds no tuneserve model: train one, or "
                                     "run `tuneserve models add-builtin`")
        return list(newest.values())
    if "all" in tags:
        raise ValueError("TUNESERVE_MODELS: 'all' stands alone; list tags, or use 'all' by itself")
    found = [load_model(t) for t in tags]
    names = [m.name for m in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"TUNESERVE_MODELS names {', '.join(twice)} more than once: one version per model name "
                         "is served (the management API switches between versions)")
    return found


def resolve_model(tag: str | None) -> StoredModel:
    """`tag`, or the built-in model when None; ModelNotFoundError says how to register what is missing."""
    if tag:
        return load_model(tag)
    try:
        return load_model(BUILTIN_NAME)
    except ModelNotFoundError:
        raise ModelNotFoundError(
            f"no model chosen (TUNESERVE_MODELS) and the built-in model {BUILTIN_NAME} is not registered: run "
            "`tuneserve models add-builtin` once, or choose models with TUNESERVE_MODELS=<name or name:version>,..."
        ) from None


def probe_device(asked: str, model: StoredModel) -> tuple[str, str]:
    """Where onnxruntime runs `model` for TUNESERVE_DEVICE=`asked` ("auto", "cuda", "cpu"), and why: "cuda" only
    when a CUDA session actually ran it, because onnxruntime lists the CUDA provider whenever onnxruntime-gpu is
    installed and a session silently falls back to the CPU when the provider cannot load (driver, CUDA or cuDNN
    libraries). Known before any worker starts: the batching limits and the worker count depend on it.
    `asked` "cuda" that cannot run is an error (ModelUnusable), not a CPU server."""
    import onnxruntime as ort

    if asked == "cpu":
        return "cpu", "TUNESERVE_DEVICE=cpu"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        reason = "onnxruntime has no CUDA provider (onnxruntime-gpu, CUDA 13 and cuDNN 9 are needed)"
    elif not gpu_present():
        reason = "no NVIDIA GPU is visible"
    else:
        from tuneserve.models.runtime import OnnxClassifier

        try:
            session = OnnxClassifier(model.path / ONNX_FILE, device="cuda", intra_op_threads=1, buckets=False,
                                     io_binding=False)
            size = model.card.preprocessing.input_size
            session(np.zeros(session.input_shape(1, size), dtype=session.input_dtype))
            return "cuda", f"a CUDA session ran {model.tag}"
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; each becomes the reason
            reason = f"the CUDA provider did not run {model.tag} ({type(e).__name__}: {e})"
    if asked == "cuda":
        raise ModelUnusable(f"TUNESERVE_DEVICE=cuda, but {reason}; use TUNESERVE_DEVICE=auto or cpu to serve on the CPU")
    log.warning("serving on the CPU: %s", reason)
    return "cpu", reason
