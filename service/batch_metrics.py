"""The images-per-inference-call histogram: its name, and reading it back from GET /metrics text.

The service records every onnxruntime call's batch size (service/service.py); tests and
benchmarks/serve_load.py read it back to see how well batching worked under a load. One parser here, so
both read it the same way. No BentoML import: reading needs only the text.
"""
from __future__ import annotations

import re

BATCH_SIZE_METRIC = "tuneserve_inference_batch_size"
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]

# One sample line of the histogram: `<name>_bucket{...,le="8.0",...} 12.0`, `<name>_count{...} 40.0`, `_sum`.
_SAMPLE = re.compile(rf'^{BATCH_SIZE_METRIC}_(bucket|sum|count)(?:\{{([^}}\n]*)\}})? ([0-9.e+]+)$', re.M)
_LE = re.compile(r'le="([^"]+)"')


def read_batch_sizes(metrics_text: str) -> dict[str, float]:
    """{"count": calls, "sum": images, "le_<bound>": calls of at most <bound> images (cumulative, as
    Prometheus counts them)}, summed over endpoints and worker processes."""
    out: dict[str, float] = {}
    for kind, labels, value in _SAMPLE.findall(metrics_text):
        le = _LE.search(labels or "")
        key = f"le_{le.group(1)}" if kind == "bucket" and le else kind
        out[key] = out.get(key, 0.0) + float(value)
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
