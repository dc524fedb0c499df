"""The onnxruntime engine on CPU: the GPU-side code paths (batch buckets, IO binding, the fp16 variant) give
the same answers as a plain session, so CPU tests cover what a GPU runs."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

from tuneserve.models.artifact import FP16_ONNX_FILE, INT8_ONNX_FILE
from tuneserve.models.precision import MIN_INT8_TOP1_AGREEMENT, MIN_TOP1_AGREEMENT, choose_precision, convert_int8
from tuneserve.models.preprocessing import preprocess_pixels
from tuneserve.models.runtime import OnnxClassifier, bucket_sizes, choose_providers, softmax
from tuneserve.models.samples import sample_photos


@pytest.fixture(scope="module")
def photos(model) -> np.ndarray:
    """The real sample photos, resized and cropped: uint8 (5, 224, 224, 3), what the built-in model's graph takes."""
    return np.stack([preprocess_pixels(p, model.card.preprocessing) for p in sample_photos()])


@pytest.mark.parametrize("max_batch, expected", [(1, [1]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8]),
                                                 (128, [1, 2, 4, 8, 16, 32, 64, 128])])
def test_bucket_sizes(max_batch, expected):
    assert bucket_sizes(max_batch) == expected


def test_cpu_session_uses_no_gpu_machinery_by_default(model):
    session = OnnxClassifier(model.onnx_path, "cpu")
    assert session.device == "cpu" and session.buckets is None and session.io_binding is False
    assert choose_providers("cpu") == ["CPUExecutionProvider"]


@pytest.mark.parametrize("options", [{"buckets": True}, {"io_binding": True}, {"buckets": True, "io_binding": True},
                                     {"spin": False, "intra_op_threads": 2}])
def test_buckets_and_io_binding_give_the_plain_answers(model, photos, options):
    plain = OnnxClassifier(model.onnx_path, "cpu")
    engine = OnnxClassifier(model.onnx_path, "cpu", max_batch=4, **options)
    # 5 photos with max_batch 4: one chunk of 4 and one of 1; 3 photos are padded to the bucket of 4.
    for n in (1, 3, 5):
        np.testing.assert_allclose(engine(photos[:n]), plain(photos[:n]), atol=1e-5)
    entries = engine.session.get_session_options()
    if options.get("spin") is False:  # unset means onnxruntime's default, spinning
        assert entries.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    else:
        with pytest.raises(RuntimeError, match="allow_spinning"):
            entries.get_session_config_entry("session.intra_op.allow_spinning")
    if options.get("buckets") and options.get("io_binding"):
        # One pre-allocated input per bucket shape that ran, never per request size.
        assert sorted(shape[0] for shape in engine._bound) == [1, 4]


def test_fp16_variant_is_made_at_export_and_agrees_with_fp32(model, photos):
    report = model.card.variants["fp16"]
    assert report["kept"] is True and report["file"] == FP16_ONNX_FILE
    assert report["top1_agreement"] >= MIN_TOP1_AGREEMENT and report["images"] == len(sample_photos())
    fp16_path = model.path / FP16_ONNX_FILE
    graph = onnx.load(str(fp16_path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8  # callers send the same pixels
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    weights = [t for t in graph.initializer if len(t.dims) == 4 and t.data_type in floats]  # convolution kernels
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)

    fp32 = OnnxClassifier(model.onnx_path, "cpu")(photos)
    fp16 = OnnxClassifier(fp16_path, "cpu")(photos)
    assert (fp16.argmax(1) == fp32.argmax(1)).all()
    assert np.abs(fp16 - fp32).max() < 0.5  # half precision: close, not equal (fp32 vs fp32 is ~1e-5)


def test_int8_variant_is_quantized_and_agrees_with_fp32(model, photos):
    report = model.card.variants["int8"]
    assert report["kept"] is True and report["file"] == INT8_ONNX_FILE
    assert report["min_top1_agreement"] == MIN_INT8_TOP1_AGREEMENT and report["calibration_images"] == len(photos)
    graph = onnx.load(str(model.path / INT8_ONNX_FILE)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops  # QDQ: onnxruntime fuses them into integer convs
    kernels = [t for t in graph.initializer if len(t.dims) == 4 and t.dims[0] > 1]
    assert kernels and all(t.data_type == onnx.TensorProto.INT8 for t in kernels)
    assert (model.path / INT8_ONNX_FILE).stat().st_size < 0.4 * model.onnx_path.stat().st_size

    fp32 = OnnxClassifier(model.onnx_path, "cpu")(photos)
    int8 = OnnxClassifier(model.path / INT8_ONNX_FILE, "cpu")(photos)
    assert (int8.argmax(1) == fp32.argmax(1)).all()
    np.testing.assert_allclose(softmax(int8), softmax(fp32), atol=report["max_abs_prob_diff"] + 1e-6)


@pytest.mark.parametrize("requested, device, has_fp16, expected", [
    ("auto", "cuda", True, "fp16"), ("auto", "cuda", False, "fp32"), ("auto", "cpu", True, "fp32"),
    ("fp32", "cuda", True, "fp32"), ("fp16", "cpu", True, "fp16"), ("int8", "cpu", True, "int8"),
])
def test_precision_choice(requested, device, has_fp16, expected):
    variants = {"fp16": {"kept": has_fp16}, "int8": {"kept": True}}
    assert choose_precision(requested, device, variants) == expected


def test_precision_errors_say_what_is_accepted():
    with pytest.raises(ValueError, match="no kept fp16 variant"):
        choose_precision("fp16", "cuda", {"fp16": {"kept": False, "top1_agreement": 0.9, "min_top1_agreement": 0.995}})
    with pytest.raises(ValueError, match=r"no kept int8 variant \(its top-1 agreed with fp32 on 97.0% of the validation "
                                         r"images, under the 99% needed\); use fp32 or auto"):
        choose_precision("int8", "cpu", {"int8": {"kept": False, "top1_agreement": 0.97, "min_top1_agreement": 0.99}})
    with pytest.raises(ValueError, match="no kept int8 variant \\(it was exported without one\\)"):
        choose_precision("int8", "cpu", {})
    with pytest.raises(ValueError, match="'int8' runs on CPUs"):
        choose_precision("int8", "cuda", {"int8": {"kept": True}})
    with pytest.raises(ValueError, match="'bf16' is not one of: auto, fp32, fp16, int8"):
        choose_precision("bf16", "cuda", {})


def test_int8_conversion_keeps_onnxruntimes_info_lines_out_of_the_log(model, photos, tmp_path, caplog):
    # onnxruntime's quantizer logs an INFO line on the root logger per weight scale it adjusts (dozens for
    # Lite0): noise in `tuneserve train`'s output. Its warnings still reach the log.
    with caplog.at_level(logging.INFO):
        convert_int8(model.onnx_path, tmp_path / "int8.onnx", photos, model.card.preprocessing)
        logging.getLogger().info("a line of our own still gets through")
    assert (tmp_path / "int8.onnx").is_file()
    noise = [r.getMessage() for r in caplog.records if r.levelno < logging.WARNING and "onnxruntime" in r.pathname]
    assert noise == []
    assert "a line of our own still gets through" in caplog.text
