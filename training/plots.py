"""PNG plots of a run: training curves and the confusion matrix (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def curves_figure(history: list[dict[str, Any]]):
    """Loss and accuracy per epoch. Top-5 appears only where the history has it (more than 5 classes: with 5
    or fewer it is always 100%). Each legend sits below its plot, so it never covers a curve."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4.6))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.plot(epochs, [h["train_top1"] for h in history], "o-", label="train top-1")
    ax_acc.plot(epochs, [h["val_top1"] for h in history], "o-", label="validation top-1")
    if any("val_top5" in h for h in history):
        ax_acc.plot(epochs, [h.get("val_top5", np.nan) for h in history], "o--", label="validation top-5")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no 1.5
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False, fontsize="small")
    fig.tight_layout()
    return fig


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig = curves_figure(history)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def row_shares(confusion: np.ndarray) -> np.ndarray:
    """confusion (C, C) counts, rows = true class -> float64 (C, C): each cell's share of its row, so the
    diagonal is each class's recall; a row without images is all 0."""
    cm = np.asarray(confusion, dtype=np.float64)
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)


def confusion_figure(confusion: list[list[int]], classes: list[str]):
    """Cells coloured by their share of the true class's images (row-normalised: a rare class's errors show as
    strongly as a common one's), the counts written in them (up to 30 classes)."""
    plt = _pyplot()
    cm = np.asarray(confusion)
    shares = row_shares(cm)
    size = min(20.0, 3.5 + 0.45 * len(classes))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row (diagonal: recall)")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), [f"{c} ({int(n)})" for c, n in zip(classes, cm.sum(axis=1))])
    ax.set(xlabel="predicted", ylabel="true (images)", title="Validation confusion matrix\ncounts; colour: share of the row")
    if len(classes) <= 30:
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if shares[i, j] > 0.5 else "black")
    fig.tight_layout()
    return fig


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path) -> None:
    plt = _pyplot()
    fig = confusion_figure(confusion, classes)
    fig.savefig(path, dpi=100)
    plt.close(fig)
