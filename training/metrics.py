"""Classification metrics from a confusion matrix (which also reduces exactly across DDP ranks)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

TOP_K = 5  # the top-k accuracy reported beside top-1


def reports_top_k(num_classes: int, k: int = TOP_K) -> bool:
    """Top-k accuracy means something only where the classes outnumber k: with k or fewer, it is always 100%."""
    return num_classes > k


def summarize(confusion: np.ndarray, loss_sum: float, top5_correct: int | None, classes: list[str]) -> dict[str, Any]:
    """confusion[i, j] = images of true class i predicted as j (int64, C x C) -> metrics dict. `top5_correct`:
    None where the classes do not outnumber 5 (reports_top_k), and then the dict has no "top5"."""
    n = int(confusion.sum())
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    actual = confusion.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    out: dict[str, Any] = {
        "images": n,
        "loss": loss_sum / max(n, 1),
        "top1": float(tp.sum() / max(n, 1)),
        "macro_f1": float(f1[actual > 0].mean()) if (actual > 0).any() else 0.0,
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(actual[i])}
            for i, c in enumerate(classes)
        },
        "confusion": confusion.astype(int).tolist(),
    }
    if top5_correct is not None:
        out["top5"] = top5_correct / max(n, 1)
    return out


# live_*: with --ema, the live (not averaged) model's, beside the EMA's val_*; schedule: what the adaptive schedule
# decided after that epoch, and why
SCALAR_COLUMNS = ["epoch", "phase", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "val_macro_f1",
                  "live_val_loss", "live_val_top1", "seconds", "images_per_s", "schedule"]


def write_history(history: list[dict[str, Any]], run_dir: Path) -> None:
    """history.json (everything, per-class included) and history.csv (one scalar row per epoch)."""
    (run_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    with (run_dir / "history.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SCALAR_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: row.get(k, "") for k in SCALAR_COLUMNS})


def write_report(val: dict[str, Any], classes: list[str], run_dir: Path) -> None:
    """Validation report of the best epoch: val_report.json, per_class.csv, confusion_matrix.csv."""
    (run_dir / "val_report.json").write_text(json.dumps(val, indent=1) + "\n")
    with (run_dir / "per_class.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "precision", "recall", "f1", "support"])
        for c in classes:
            m = val["per_class"][c]
            w.writerow([c, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", m["support"]])
    with (run_dir / "confusion_matrix.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *classes])
        for c, row in zip(classes, val["confusion"]):
            w.writerow([c, *row])
