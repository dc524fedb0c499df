"""Evaluate a registered ONNX model on a labelled folder, through the same runtime and preprocessing as serving."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from tuneserve.models.preprocessing import preprocess_pixels
from tuneserve.models.runtime import OnnxClassifier
from tuneserve.models.store import StoredModel
from tuneserve.training.data import DataError, scan_class_folders, probe_image
from tuneserve.training.metrics import TOP_K, reports_top_k, summarize

log = logging.getLogger(__name__)


def evaluate_stored(model: StoredModel, data: str, batch_size: int = 32, device: str = "auto") -> dict[str, Any]:
    """DIR/<class>/* (or DIR/val/<class>/* when DIR has a val/ folder); class names must be model labels."""
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist or is not a folder")
    folder = root / "val" if (root / "val").is_dir() else root
    labels = model.card.labels
    pairs = scan_class_folders(folder)
    unknown = sorted({c for _, c in pairs} - set(labels))
    if unknown:
        raise DataError(f"class folders {unknown} in {folder} are not labels of {model.tag} (labels: {labels})")
    usable = [(p, c) for p, c in pairs if probe_image(str(p)) is None]
    if not usable:
        raise DataError(f"no usable images in {folder}")
    index = {c: i for i, c in enumerate(labels)}
    session = OnnxClassifier(model.onnx_path, device=device)
    pp = model.card.preprocessing
    n = len(labels)
    confusion = np.zeros((n, n), dtype=np.int64)
    loss_sum, top5 = 0.0, 0
    for start in range(0, len(usable), batch_size):
        chunk = usable[start : start + batch_size]
        x = session.inputs(np.stack([preprocess_pixels(p, pp) for p, _ in chunk]), pp)  # pixels (B, S, S, 3)
        y = np.array([index[c] for _, c in chunk])
        logits = session(x).astype(np.float64)  # (B, C)
        z = logits - logits.max(1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(1, keepdims=True))
        loss_sum += float(-log_probs[np.arange(len(y)), y].sum())
        np.add.at(confusion, (y, logits.argmax(1)), 1)
        if reports_top_k(n):
            top5 += int((np.argsort(-logits, 1)[:, :TOP_K] == y[:, None]).any(1).sum())
    metrics = summarize(confusion, loss_sum, top5 if reports_top_k(n) else None, labels)
    metrics["skipped"] = len(pairs) - len(usable)
    metrics["provider"] = session.providers[0]
    return metrics
