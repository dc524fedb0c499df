"""The images-per-inference-call histogram: its name, and reading it back from GET /metrics text.

The service records every onnxruntime call's batch size (service/service.py); tests and
benchmarks/serve_load.py read it back to see how well batching worked under a load. One parser here, so
both read it the same way. Reading uses prometheus_client's own parser of the text format.
"""
from __future__ import annotations

BATCH_SIZE_METRIC = "tuneserve_inference_batch_size"
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def read_batch_sizes(metrics_text: str) -> dict[str, float]:
    """{"count": calls, "sum": images, "le_<bound>": calls of at most <bound> images (cumulative, as
    Prometheus counts them)}, summed over endpoints and worker processes."""
    # Imported here: prometheus_client picks its (multi-process or not) mode when first imported, which
    # must happen after BentoML has set PROMETHEUS_MULTIPROC_DIR in a worker.
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != BATCH_SIZE_METRIC:
            continue
        for sample in family.samples:
            kind = sample.name[len(BATCH_SIZE_METRIC) + 1:]  # bucket, sum, count (or created)
            if kind == "bucket":
                key = f"le_{sample.labels['le']}"
            elif kind in ("sum", "count"):
                key = kind
            else:
                continue
            out[key] = out.get(key, 0.0) + sample.value
    return out


def batch_sizes_between(before: str, after: str) -> dict:
    """Calls made between two scrapes and their mean size in images, with the bucket counts."""
    b, a = read_batch_sizes(before), read_batch_sizes(after)
    delta = {k: a[k] - b.get(k, 0.0) for k in a}
    calls = delta.get("count", 0.0)
    buckets = {k[3:]: int(v) for k, v in delta.items() if k.startswith("le_")}
    order = sorted(buckets, key=lambda le: float("inf") if le == "+Inf" else float(le))
    return {"calls": int(calls), "mean_images_per_call": (delta["sum"] / calls) if calls else None,
            "buckets": {le: buckets[le] for le in order}}
