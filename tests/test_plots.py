"""The run's own pictures read right on imbalanced data: the confusion matrix coloured by each row's share,
top-5 only where the classes outnumber 5, legends beside (not over) the curves."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneserve.training.distributed import DistEnv
from tuneserve.training.loop import evaluate
from tuneserve.training.plots import confusion_figure, curves_figure, row_shares

# A dominant class (900 photos, 9 wrong) beside a rare one (10 photos, 5 wrong).
IMBALANCED = [[891, 9], [5, 5]]


def test_the_confusion_matrix_is_coloured_by_row_share_with_counts_in_the_cells():
    fig = confusion_figure(IMBALANCED, ["common", "rare"])
    ax = fig.axes[0]
    colours = np.asarray(ax.images[0].get_array())
    assert colours == pytest.approx(np.array([[0.99, 0.01], [0.5, 0.5]]))
    # By raw counts the rare class's 5 errors would be 0.6% of the scale; by its row they are half its photos.
    assert colours[1, 0] > 40 * (5 / 891)
    assert {t.get_text() for t in ax.texts} == {"891", "9", "5"}
    assert [t.get_text() for t in ax.get_yticklabels()] == ["common (900)", "rare (10)"]
    assert row_shares(np.array([[0, 0], [1, 3]])).tolist() == [[0, 0], [0.25, 0.75]]  # an empty row stays 0


def history(top5: bool) -> list[dict]:
    rows = []
    for e in range(1, 6):
        row = {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_top1": 0.5 + 0.09 * e,
               "val_top1": 0.95 + 0.01 * (e % 2)}
        if top5:
            row["val_top5"] = 0.99
        rows.append(row)
    return rows


@pytest.mark.parametrize("top5", [False, True])
def test_curve_legends_sit_outside_the_plots(top5):
    fig = curves_figure(history(top5))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        plot = ax.get_window_extent(renderer)
        assert legend.y1 <= plot.y0, "the legend overlaps the plotting area"
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert ("validation top-5" in labels) == top5


class FixedLogits(torch.nn.Module):
    """Ranks the classes 0, 1, 2, ... for every image: its top-1 is class 0, its top-5 classes 0 to 4."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.arange(self.classes, dtype=torch.float32).expand(len(x), -1)


@pytest.mark.parametrize("classes, has_top5", [(5, False), (6, True)])
def test_top5_is_reported_only_where_the_classes_outnumber_5(classes, has_top5):
    x = torch.zeros(4, 3, 2, 2)
    y = torch.tensor([0, 1, 2, 3])
    metrics = evaluate(FixedLogits(classes), [(x, y)], DistEnv(), None, False, [f"c{i}" for i in range(classes)])
    assert ("top5" in metrics) == has_top5
    if has_top5:
        assert metrics["top5"] == 1.0 and metrics["top1"] == 0.25
