"""Metric arithmetic on a hand-checked confusion matrix."""
import numpy as np
import pytest

from tuneserve.training.metrics import summarize


def test_summarize_known_confusion():
    # rows = true class, columns = predicted
    cm = np.array([[3, 1, 0], [0, 2, 0], [1, 0, 0]])
    m = summarize(cm, loss_sum=7.0, top5_correct=None, classes=["a", "b", "c"])
    assert m["images"] == 7 and m["top1"] == pytest.approx(5 / 7) and m["loss"] == pytest.approx(1.0)
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(3 / 4), pytest.approx(3 / 4), 4)
    assert (b["precision"], b["recall"]) == (pytest.approx(2 / 3), 1.0)
    assert (c["precision"], c["recall"], c["f1"]) == (0.0, 0.0, 0.0)  # never predicted: 0, not NaN
    assert m["macro_f1"] == pytest.approx((0.75 + 0.8 + 0.0) / 3)
    assert "top5" not in m
    assert summarize(cm, 0.0, 6, ["a", "b", "c"])["top5"] == pytest.approx(6 / 7)


def test_batch_size_histogram_is_read_from_prometheus_text():
    from tuneserve.service.engine.batch_metrics import batch_sizes_between, read_batch_sizes

    # What BentoML's /metrics shows: one series per endpoint, floats in any Prometheus notation.
    text = """# HELP tuneserve_inference_batch_size images per onnxruntime call
# TYPE tuneserve_inference_batch_size histogram
tuneserve_inference_batch_size_bucket{endpoint="/classify",le="1.0"} 2.0
tuneserve_inference_batch_size_bucket{endpoint="/classify",le="8.0"} 3.0
tuneserve_inference_batch_size_bucket{endpoint="/classify",le="+Inf"} 3.0
tuneserve_inference_batch_size_sum{endpoint="/classify"} 9.0
tuneserve_inference_batch_size_count{endpoint="/classify"} 3.0
tuneserve_inference_batch_size_bucket{endpoint="/classify_batch",le="1.0"} 0.0
tuneserve_inference_batch_size_bucket{endpoint="/classify_batch",le="8.0"} 1.0
tuneserve_inference_batch_size_bucket{endpoint="/classify_batch",le="+Inf"} 1.0
tuneserve_inference_batch_size_sum{endpoint="/classify_batch"} 1e+01
tuneserve_inference_batch_size_count{endpoint="/classify_batch"} 1.0
# TYPE other_seconds histogram
other_seconds_sum 1e-05
"""
    sizes = read_batch_sizes(text)
    assert sizes == {"le_1.0": 2.0, "le_8.0": 4.0, "le_+Inf": 4.0, "sum": 19.0, "count": 4.0}
    assert read_batch_sizes("") == {}
    delta = batch_sizes_between("", text)
    assert delta["calls"] == 4 and delta["mean_images_per_call"] == 19 / 4
    assert list(delta["buckets"]) == ["1.0", "8.0", "+Inf"]
