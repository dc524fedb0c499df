"""Service settings: one frozen dataclass, filled from `TUNESERVE_*` environment variables.

Environment variables are the only channel that reaches every `bentoml serve` worker process (and a
container built from the Bento), so `tuneserve serve` flags are turned into these variables too.
Every field names its variable in `metadata["env"]`; a bad value fails start-up with a message that
names the variable, the value and what is accepted.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from tuneserve.models.precision import PRECISIONS
from tuneserve.models.preprocessing import DEFAULT_MAX_PIXELS

DEVICES = ("auto", "cuda", "cpu")
MODEL_CONTROL = ("none", "poll", "explicit")

# Batching defaults per device, chosen by measurement (docs/benchmarks.md, "Serving: batching").
# CPU (2 cores, EfficientNet-Lite0, one onnxruntime thread per worker as served): onnxruntime's cost per image is
# flat up to batch 4 and grows past it as a batch's activations outgrow the caches (200 / 205 / 198 img/s at
# batch 1 / 2 / 4, 177 at 8, 164 at 16; ResNet-50 flat at 27-28 from 1 to 16). Under a flood every call is
# full, so the bound is the batch size the model runs at: 4 served 5% and 8% more 200s than 8 at 64 and 256
# closed-loop connections (one run, interleaved). A call still takes whatever is queued, up to the bound.
# The latency bound only decides when queued work is shed with 503.
# CUDA: not measured (benchmarks/gpu_suite.sh measures it). EfficientNet-class models keep gaining throughput
# up to batch 32-64 on a data-centre GPU, where a batch of 64 takes milliseconds: 64 is the starting point.
BATCHING_DEFAULTS = {"cpu": (4, 1000), "cuda": (64, 1000)}


def _setting(default: Any, env: str, help: str, minimum: int | None = None, choices: tuple[str, ...] | None = None,
             flag: str | None = None, repeat: bool = False, secret: bool = False) -> Any:
    """A setting: its variable, its help, and how the CLI shows it (`flag`, repeatable, or none for a secret,
    which belongs in the environment or a file, never on a command line that `ps` shows)."""
    return field(default=default, repr=not secret, metadata={
        "env": env, "help": help, "min": minimum, "choices": choices, "flag": flag, "repeat": repeat, "secret": secret})


@dataclass(frozen=True)
class ServiceConfig:
    models: str | None = _setting(
        None, "TUNESERVE_MODELS", "models to serve: tags (name = its latest version, or name:version), "
        "comma-separated, or 'all' for every tuneserve model in the store; none: the built-in ImageNet model "
        "(TUNESERVE_MODEL is read too)", flag="--model", repeat=True)
    default_model: str | None = _setting(
        None, "TUNESERVE_DEFAULT_MODEL", "name of the model that /classify, /classify_batch and /model serve "
        "(default: the first one)", flag="--default")
    model_control: str = _setting(
        "none", "TUNESERVE_MODEL_CONTROL", "none: the versions chosen at start are served; poll: a new version "
        "registered in the store is loaded, warmed up and switched to; explicit: versions change through the "
        "management API only", choices=MODEL_CONTROL)
    poll_interval_s: int = _setting(5, "TUNESERVE_POLL_INTERVAL_S", "how often poll mode looks at the store", 1)
    api_key: str | None = _setting(None, "TUNESERVE_API_KEY", "key that inference routes require as "
                                   "'Authorization: Bearer <key>' (none: no key)", secret=True)
    api_key_file: str | None = _setting(None, "TUNESERVE_API_KEY_FILE", "file holding that key (a mounted "
                                        "secret)", secret=True)
    admin_key: str | None = _setting(None, "TUNESERVE_ADMIN_KEY", "key of the management API (load, unload, "
                                     "roll back models); none: the API does not exist", secret=True)
    admin_key_file: str | None = _setting(None, "TUNESERVE_ADMIN_KEY_FILE", "file holding that key", secret=True)
    metrics_auth: bool = _setting(False, "TUNESERVE_METRICS_AUTH", "/metrics requires the API key too")
    allow_no_key: bool = _setting(False, "TUNESERVE_ALLOW_NO_KEY", "serve on a non-loopback address without an API "
                                  "key (anyone who reaches the port can use every model); without it, that refuses "
                                  "to start", flag="--allow-no-key")
    device: str = _setting("auto", "TUNESERVE_DEVICE", "onnxruntime device: auto (CUDA when usable), cuda or cpu",
                           choices=DEVICES)
    max_batch_size: int | None = _setting(
        None, "TUNESERVE_MAX_BATCH_SIZE", "most images per inference call; 1 turns batching off "
        "(default: measured per device, docs/serving.md)", 1)
    max_latency_ms: int | None = _setting(
        None, "TUNESERVE_MAX_LATENCY_MS", "every request is answered within this many ms of its arrival, or "
        "refused with 503 (default: measured per device)", 1)
    max_image_bytes: int = _setting(20 * 1024 * 1024, "TUNESERVE_MAX_IMAGE_BYTES", "largest accepted image file (413 above)", 1)
    max_pixels: int = _setting(DEFAULT_MAX_PIXELS, "TUNESERVE_MAX_PIXELS", "largest accepted width x height (413 above: decompression bombs)", 1)
    max_request_bytes: int = _setting(128 * 1024 * 1024, "TUNESERVE_MAX_REQUEST_BYTES", "largest /classify_batch body, all images together (413 above)", 1)
    max_decode_mb: int = _setting(512, "TUNESERVE_MAX_DECODE_MB", "most memory (MiB) one image may need to decode, "
                                  "known from its header: 40 Mpx of 16-bit grey need ~240 (413 above)", 1)
    decode_memory_mb: int = _setting(1024, "TUNESERVE_DECODE_MEMORY_MB", "memory (MiB) the decodes running at once "
                                     "in a worker may need together; more waits, until its deadline (503)", 1)
    max_batch_images: int = _setting(64, "TUNESERVE_MAX_BATCH_IMAGES", "most images in one /classify_batch request (413 above)", 1)
    max_in_flight: int = _setting(512, "TUNESERVE_MAX_IN_FLIGHT", "images being decoded or classified per worker before new requests get 503", 1)
    top_k: int = _setting(5, "TUNESERVE_TOP_K", "predictions per image when the request does not say", 1)
    preprocess_threads: int = _setting(0, "TUNESERVE_PREPROCESS_THREADS", "decode/preprocess threads per worker (0: the CPUs over the workers, 2 to 16)", 0)
    ort_threads: int = _setting(0, "TUNESERVE_ORT_THREADS", "onnxruntime intra-op threads per worker (0: on CPU the CPUs over the workers, idle ones sleeping; on CUDA 1)", 0)
    precision: str = _setting("auto", "TUNESERVE_PRECISION", "model precision: auto (fp16 on CUDA where the model "
                              "has a kept fp16 variant, else fp32), fp32, fp16, or int8 (CPU, where the model has a "
                              "kept INT8 variant)", choices=PRECISIONS)
    gpu_decode: str = _setting("auto", "TUNESERVE_GPU_DECODE", "JPEG decoding on the GPU with nvImageCodec: auto (on "
                               "CUDA, where it is installed and decodes as the CPU does), off",
                               choices=("auto", "off"))
    workers: int = _setting(0, "TUNESERVE_WORKERS", "worker processes, each with its own onnxruntime session and "
                            "batcher (0: 2 on CPU, for availability; on CUDA one per 2 CPUs, at most 8)", 0)
    timeout_s: int = _setting(60, "TUNESERVE_TIMEOUT_S", "per-request timeout in seconds", 1)
    header_timeout_s: int = _setting(10, "TUNESERVE_HEADER_TIMEOUT_S", "seconds a request's headers may take to "
                                     "arrive (408 after; also closes connections that send nothing)", 1)
    body_timeout_s: int = _setting(30, "TUNESERVE_BODY_TIMEOUT_S", "seconds a request's body may take to arrive "
                                   "(408 after)", 1)
    grpc_port: int = _setting(8001, "TUNESERVE_GRPC_PORT", "port of the Open Inference Protocol over gRPC (8001 "
                              "as Triton's), on the HTTP address, shared by every worker; 0: no gRPC", 0)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, minimum, choices = getattr(self, f.name), f.metadata["min"], f.metadata["choices"]
            if choices and value not in choices:
                raise ValueError(f"{f.metadata['env']}={value!r} is not one of: {', '.join(choices)}")
            if minimum is not None and value is not None and value < minimum:
                raise ValueError(f"{f.metadata['env']}={value} is out of range: it must be an integer >= {minimum}")
        if self.grpc_port > 65535:
            raise ValueError(f"TUNESERVE_GRPC_PORT={self.grpc_port} is not a port: use 1..65535, or 0 for no gRPC")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ServiceConfig":
        """Read every TUNESERVE_* variable that is set (and not empty); unset ones keep their defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"], "").strip()
            if not raw and f.name == "models":
                raw = environ.get("TUNESERVE_MODEL", "").strip()  # the one-model name it had first
            if not raw:
                continue
            if "str" in str(f.type):  # annotations are strings here (from __future__ import annotations)
                values[f.name] = raw
                continue
            if str(f.type) == "bool":
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(f"{f.metadata['env']}={raw!r} is not a boolean: use true or false")
                values[f.name] = raw.lower() in ("1", "true", "yes")
                continue
            try:
                values[f.name] = int(raw)
            except ValueError:
                raise ValueError(f"{f.metadata['env']}={raw!r} is not an integer ({f.metadata['help']})") from None
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The variables that reproduce this config in another process (unset fields are left out)."""
        return {f.metadata["env"]: str(getattr(self, f.name)).lower() if isinstance(getattr(self, f.name), bool)
                else str(getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def model_tags(self) -> list[str]:
        """The tags asked for ("all" stays as it is; none: an empty list)."""
        return [t.strip() for t in (self.models or "").split(",") if t.strip()]

    def key(self, which: str) -> str | None:
        """The API key ("api") or admin key ("admin"): from its variable, or read from its file."""
        value, path = getattr(self, f"{which}_key"), getattr(self, f"{which}_key_file")
        if value:
            return value
        if not path:
            return None
        try:
            text = open(path).read().strip()
        except OSError as e:
            raise ValueError(f"TUNESERVE_{which.upper()}_KEY_FILE={path!r} cannot be read: {e.strerror}") from None
        if not text:
            raise ValueError(f"TUNESERVE_{which.upper()}_KEY_FILE={path!r} is empty")
        return text

    def batching(self, device: str) -> tuple[int, int]:
        """(max_batch_size, max_latency_ms) for `device` ("cpu" or "cuda"): explicit settings win."""
        size, latency = BATCHING_DEFAULTS["cuda" if device == "cuda" else "cpu"]
        return (self.max_batch_size or size, self.max_latency_ms or latency)

    def worker_count(self, device: str) -> int:
        """Worker processes. CPU: 2 where there are 2 CPUs or more, so that a worker that dies (OOM, a crash)
        leaves one serving while it restarts: with one worker, killing it gave 3.4-9 s with no answers; with
        two, every request was answered; and on 2 cores two workers served as many images as one (128-160 vs
        129-137 img/s at 16 clients, runs interleaved; docs/benchmarks.md "Workers on a CPU host").
        CUDA: the model leaves the CPU, and each worker's event loop then bounds it: ~2.7 ms of event-loop
        time per single-image request (HTTP, middleware, hand-offs, JSON; py-spy, docs/benchmarks.md "What a
        request costs"), i.e. a few hundred requests/s per worker against a target of thousands. One per 2
        CPUs (the rest decode), at most 8 (each holds its own CUDA session). Arithmetic from CPU
        measurements: benchmarks/gpu_suite.sh measures 1, 2 and 4."""
        if self.workers:
            return self.workers
        cpus = os.cpu_count() or 1
        if device != "cuda":
            return min(2, cpus)
        return max(1, min(8, cpus // 2))

    def threads(self, workers: int = 1) -> int:
        """Decode/preprocess threads per worker: the CPUs shared among the workers, at most 16 each, and at
        least 2, so that one is always left for ordinary photos while the other decodes a huge image
        (service/engine/decode_budget.py)."""
        return self.preprocess_threads or max(2, min(16, (os.cpu_count() or 1) // max(1, workers)))

    def onnxruntime_threads(self, device: str, workers: int = 1) -> int:
        """Intra-op threads for each worker's session.
        On CPU the model shares the machine with decoding, and the workers share it with each other: the
        CPUs split among the workers, idle threads sleeping (spinning is turned off on CPU). Measured on 2
        cores (docs/benchmarks.md, "CPU threads"): one worker served 160-165 img/s at 16 clients with both
        cores, 143-150 with one, 138 with both spinning; two workers at 4x overload kept 134-138 img/s with
        one thread each and 128-136 with two each, whose four threads on two cores also delayed the event
        loops (p99 of 503s 27-37 ms against 62-98). On CUDA these threads only run the graph's few CPU-side
        nodes (shapes, the odd cast) while the GPU runs the convolutions: one per worker feeds it, where
        onnxruntime's default (one per core, spinning) would put every core of every worker to busy-waiting
        beside the decoders."""
        if self.ort_threads:
            return self.ort_threads
        if device == "cuda":
            return 1
        return max(1, (os.cpu_count() or 1) // max(1, workers))


LOOPBACK = ("127.", "::1", "localhost")


def check_exposure(config: ServiceConfig, host: str) -> None:
    """Refuse (ValueError) to serve on a non-loopback `host` without an API key unless allowed: TorchServe, after
    its 2023 remote-code CVEs, starts with token auth on and binds 127.0.0.1; loopback without a key stays easy
    for local use."""
    if host.startswith(LOOPBACK) or config.key("api") is not None or config.allow_no_key:
        return
    raise ValueError(f"refusing to serve on {host} without an API key: anyone who can reach that address could use "
                     "every model. Set TUNESERVE_API_KEY (or TUNESERVE_API_KEY_FILE), serve on 127.0.0.1 "
                     "(--host 127.0.0.1), or accept an open endpoint with --allow-no-key (TUNESERVE_ALLOW_NO_KEY=true)")


def describe_settings() -> str:
    """One line per variable, for --help texts and docs."""
    return "\n".join(f"  {f.metadata['env']:<30} {f.metadata['help']}" for f in dataclasses.fields(ServiceConfig))
