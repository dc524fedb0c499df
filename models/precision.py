"""Precision variants of an exported model: fp16 for GPUs, checked against fp32 on real images.

Half precision roughly doubles a GPU's convolution throughput (tensor cores) and halves weight memory; on a
CPU it is slower (onnxruntime inserts casts around ops without fp16 kernels), so serving picks it only on
CUDA. The graph keeps its input and output types (`keep_io_types`: uint8 pixels or float32 in, float32
logits out): callers and preprocessing do not change, and the casts run on the device. A variant is kept only
where its top-1 agrees with fp32 on real images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tuneserve.models.preprocessing import Preprocessing
from tuneserve.models.runtime import OnnxClassifier, softmax

MIN_TOP1_AGREEMENT = 0.995  # fp16 may flip near-ties; more disagreement than this means a numerically fragile graph
PRECISIONS = ("auto", "fp32", "fp16")


def convert_fp16(fp32_path: Path, out_path: Path) -> Path:
    """Write the fp16 version of `fp32_path` (weights and activations fp16; the same input, float32 logits)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return out_path


def agreement_report(fp32_path: Path, variant_path: Path, pixels: np.ndarray, pp: Preprocessing,
                     device: str = "cpu") -> dict[str, Any]:
    """pixels: uint8 (N,S,S,3), real images resized and cropped. Top-1 agreement and probability differences."""
    fp32, variant = OnnxClassifier(fp32_path, device=device), OnnxClassifier(variant_path, device=device)
    reference = fp32(fp32.inputs(pixels, pp))  # (N, C) logits
    variant = variant(variant.inputs(pixels, pp))
    p_ref, p_var = softmax(reference), softmax(variant)
    agreement = float((reference.argmax(1) == variant.argmax(1)).mean())
    return {
        "images": int(pixels.shape[0]),
        "top1_agreement": agreement,
        "max_abs_prob_diff": float(np.abs(p_ref - p_var).max()),
        "max_abs_logit_diff": float(np.abs(reference - variant).max()),
        "min_top1_agreement": MIN_TOP1_AGREEMENT,
        "kept": agreement >= MIN_TOP1_AGREEMENT,
    }


def choose_precision(requested: str, device: str, variants: dict[str, dict[str, Any]]) -> str:
    """'fp32' or 'fp16' for a session on `device` ("cuda"/"cpu"): auto = fp16 on CUDA where a kept variant exists."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of: {', '.join(PRECISIONS)}")
    has_fp16 = bool(variants.get("fp16", {}).get("kept"))
    if requested == "fp16" and not has_fp16:
        raise ValueError("precision 'fp16' was asked for, but this model has no kept fp16 variant "
                         "(re-export it with this tuneserve, or use fp32/auto)")
    if requested == "auto":
        return "fp16" if device == "cuda" and has_fp16 else "fp32"
    return requested
