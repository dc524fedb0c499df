"""Precision variants of an exported model, each checked against fp32 on real images: fp16 for GPUs, INT8 for
CPUs.

Half precision roughly doubles a GPU's convolution throughput (tensor cores) and halves weight memory; on a
CPU it is slower (onnxruntime inserts casts around ops without fp16 kernels), so serving picks it only on
CUDA. The graph keeps its input and output types (`keep_io_types`: uint8 pixels or float32 in, float32
logits out): callers and preprocessing do not change, and the casts run on the device. A variant is kept only
where its top-1 agrees with fp32 on real images.

INT8 is onnxruntime's static quantization in QDQ form (weights int8 per channel, activations uint8, ranges
calibrated on training images): integer convolutions where the CPU has them (VNNI), a quarter of the weight
bytes. It changes answers more than fp16 does, so it has its own bar, and serving runs it only when asked
(`TUNESERVE_PRECISION=int8`): peers are compared at equal precision.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tuneserve.models.preprocessing import Preprocessing
from tuneserve.models.runtime import OnnxClassifier, softmax

MIN_TOP1_AGREEMENT = 0.995  # fp16 may flip near-ties; more disagreement than this means a numerically fragile graph
# INT8 rounds every activation to 256 levels: near-ties flip more often; beyond 1 image in 100 it is a worse model.
MIN_INT8_TOP1_AGREEMENT = 0.99
PRECISIONS = ("auto", "fp32", "fp16", "int8")


def convert_fp16(fp32_path: Path, out_path: Path) -> Path:
    """Write the fp16 version of `fp32_path` (weights and activations fp16; the same input, float32 logits)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return out_path


def convert_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray, pp: Preprocessing) -> Path:
    """Write the INT8 (QDQ) version of `fp32_path`, activation ranges calibrated on `calibration`: uint8
    (N, S, S, 3) pixels of training images (fed in batches of 8, normalised first for float-input graphs)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    session = OnnxClassifier(fp32_path, device="cpu")
    batches = [{session.input_name: session.inputs(calibration[i:i + 8], pp)} for i in range(0, len(calibration), 8)]

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    # onnxruntime's recommended first step: shapes inferred and the graph optimised, so that quantization
    # sees fused Conv+BatchNorm+activation.
    prepared = out_path.with_suffix(".prepared.onnx")
    with _quiet_onnxruntime_info():
        quant_pre_process(str(fp32_path), str(prepared))
        try:
            quantize_static(str(prepared), str(out_path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        finally:
            prepared.unlink(missing_ok=True)
    return out_path


@contextlib.contextmanager
def _quiet_onnxruntime_info() -> Iterator[None]:
    """Drop the INFO records of onnxruntime's quantization tools, most of them logged on the root logger (one
    per adjusted weight scale: 87 lines for EfficientNet-Lite0); their warnings still pass."""
    import onnxruntime

    package = str(Path(onnxruntime.__file__).parent)

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(package)

    root, own = logging.getLogger(), logging.getLogger("onnxruntime")
    level = own.level
    root.addFilter(keep)
    own.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.removeFilter(keep)
        own.setLevel(level)


def onnx_logits(path: Path, pixels: np.ndarray, pp: Preprocessing, device: str = "cpu") -> np.ndarray:
    """pixels: uint8 (N,S,S,3), resized and cropped -> (N, C) float32 logits of the graph at `path`."""
    session = OnnxClassifier(path, device=device)
    return session(session.inputs(pixels, pp))


def agreement_report(reference: np.ndarray, variant_path: Path, pixels: np.ndarray, pp: Preprocessing,
                     device: str = "cpu", min_agreement: float = MIN_TOP1_AGREEMENT) -> dict[str, Any]:
    """reference: the fp32 graph's (N, C) logits on `pixels` (uint8 (N,S,S,3), real images resized and
    cropped), computed once for every variant. Top-1 agreement and probability differences."""
    variant = onnx_logits(variant_path, pixels, pp, device)
    p_ref, p_var = softmax(reference), softmax(variant)
    agreement = float((reference.argmax(1) == variant.argmax(1)).mean())
    return {
        "images": int(pixels.shape[0]),
        "top1_agreement": agreement,
        "max_abs_prob_diff": float(np.abs(p_ref - p_var).max()),
        "max_abs_logit_diff": float(np.abs(reference - variant).max()),
        "min_top1_agreement": min_agreement,
        "kept": agreement >= min_agreement,
    }


def choose_precision(requested: str, device: str, variants: dict[str, dict[str, Any]]) -> str:
    """'fp32', 'fp16' or 'int8' for a session on `device` ("cuda"/"cpu"): auto = fp16 on CUDA where a kept
    variant exists, else fp32 (INT8 only when asked for: it answers differently more often than fp16)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of: {', '.join(PRECISIONS)}")
    if requested == "auto":
        return "fp16" if device == "cuda" and variants.get("fp16", {}).get("kept") else "fp32"
    if requested in ("fp16", "int8") and not variants.get(requested, {}).get("kept"):
        report = variants.get(requested)
        why = (f"its top-1 agreed with fp32 on {report['top1_agreement']:.1%} of the validation images, under the "
               f"{report['min_top1_agreement']:.0%} needed" if report else "it was exported without one")
        raise ValueError(f"precision {requested!r} was asked for, but this model has no kept {requested} variant "
                         f"({why}); use fp32 or auto, or re-export it with this tuneserve")
    if requested == "int8" and device == "cuda":
        raise ValueError("precision 'int8' runs on CPUs (onnxruntime's CUDA provider has no INT8 convolutions); "
                         "on CUDA use fp16, fp32 or auto")
    return requested
