"""What the service measures, per model name and version: requests by status and their latency, time waiting
for the engine, inference time per call and images per call; and failed loads.

`Metrics` is what the rest of the service calls; `PrometheusMetrics` records it with BentoML's metrics
(Prometheus, multi-process safe, on GET /metrics beside BentoML's own); `Metrics` itself records nothing,
for tests and benchmarks that build a worker without a server.
"""
from __future__ import annotations

from tuneserve.service.engine.batch_metrics import BATCH_SIZE_BUCKETS, BATCH_SIZE_METRIC

# Seconds: from a few ms (one image on a GPU) to past the default 1 s latency bound.
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class Metrics:
    def request(self, model: str, version: str, status: int, seconds: float) -> None:
        pass

    def engine_wait(self, model: str, version: str, seconds: float) -> None:
        pass

    def batch(self, model: str, version: str, images: int, seconds: float) -> None:
        pass

    def load_failed(self, model: str) -> None:
        pass


class PrometheusMetrics(Metrics):
    def __init__(self) -> None:
        import bentoml

        labels = ["model", "version"]
        self._requests = bentoml.metrics.Counter(
            name="tuneserve_requests", documentation="classify requests answered, by model, version and status",
            labelnames=[*labels, "status"])
        self._latency = bentoml.metrics.Histogram(
            name="tuneserve_request_duration_seconds", documentation="classify requests, from arrival to answer",
            labelnames=labels, buckets=LATENCY_BUCKETS)
        self._wait = bentoml.metrics.Histogram(
            name="tuneserve_engine_wait_seconds", documentation="time images waited in the batcher for the model",
            labelnames=labels, buckets=LATENCY_BUCKETS)
        self._inference = bentoml.metrics.Histogram(
            name="tuneserve_inference_seconds", documentation="one onnxruntime call", labelnames=labels,
            buckets=LATENCY_BUCKETS)
        self._batch = bentoml.metrics.Histogram(
            name=BATCH_SIZE_METRIC, documentation="images per onnxruntime call", labelnames=labels,
            buckets=BATCH_SIZE_BUCKETS)
        self._failed = bentoml.metrics.Counter(
            name="tuneserve_model_load_failures", documentation="versions that failed to load or warm up and "
            "were not switched to", labelnames=["model"])

    def request(self, model: str, version: str, status: int, seconds: float) -> None:
        self._requests.labels(model=model, version=version, status=str(status)).inc()
        self._latency.labels(model=model, version=version).observe(seconds)

    def engine_wait(self, model: str, version: str, seconds: float) -> None:
        self._wait.labels(model=model, version=version).observe(seconds)

    def batch(self, model: str, version: str, images: int, seconds: float) -> None:
        self._batch.labels(model=model, version=version).observe(images)
        self._inference.labels(model=model, version=version).observe(seconds)

    def load_failed(self, model: str) -> None:
        self._failed.labels(model=model).inc()
