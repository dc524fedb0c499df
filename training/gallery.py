"""Photo grids of a run (matplotlib, headless): the validation photos the model is most confidently wrong
about, with where it looked (top_losses.png), and the photos whose label is likely wrong (label_issues.png)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tuneserve.models.preprocessing import load_image
from tuneserve.training.label_issues import LabelIssue
from tuneserve.training.plots import _pyplot

THUMBNAIL = 320  # longest side, pixels, of each photo drawn in a grid


@dataclass
class Mistake:
    path: str
    true_label: str
    predicted: str
    probability: float  # the predicted class's probability
    overlay: Image.Image  # the predicted class's CAM over the photo (models/explain.py)


def thumbnail(path: str) -> Image.Image:
    img = load_image(path, draft_size=THUMBNAIL)
    img.thumbnail((THUMBNAIL, THUMBNAIL))
    return img


def _short(text: str, width: int = 28) -> str:
    """At most `width` characters: long class and file names would run into the next panel's title."""
    return text if len(text) <= width else text[:width - 1] + "…"


def plot_top_losses(mistakes: list[Mistake], path: Path, per_row: int = 2) -> Path:
    """Two panels per mistake: the photo (true and predicted class, probability), then the predicted class's
    activation map over it. An empty list still writes a picture that says so."""
    plt = _pyplot()
    rows = max(1, -(-len(mistakes) // per_row))
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(3.2 * 2 * per_row, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not mistakes:
        axes[0, 0].text(0, 0.5, "no validation photo was misclassified", fontsize=12, transform=axes[0, 0].transAxes)
    for k, m in enumerate(mistakes):
        ax_photo, ax_cam = axes[k // per_row, 2 * (k % per_row)], axes[k // per_row, 2 * (k % per_row) + 1]
        ax_photo.imshow(thumbnail(m.path))
        ax_photo.set_title(f"true: {_short(m.true_label)}\npredicted: {_short(m.predicted)} ({m.probability:.2f})",
                           fontsize=9, color="firebrick")
        ax_cam.imshow(m.overlay)
        ax_cam.set_title(f"where it saw\n{_short(m.predicted)}", fontsize=9)
    fig.suptitle("Validation photos the model is most confidently wrong about", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def plot_label_issues(issues: list[LabelIssue], path: Path, max_photos: int = 16, per_row: int = 4) -> Path:
    """The most suspect photos first: each with its given label, the suggested one, and its label quality."""
    plt = _pyplot()
    shown = issues[:max_photos]
    rows = max(1, -(-len(shown) // per_row))
    fig, axes = plt.subplots(rows, per_row, figsize=(3.2 * per_row, 3.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not shown:
        axes[0, 0].text(0, 0.5, "cleanlab flagged no photo", fontsize=12, transform=axes[0, 0].transAxes)
    for k, issue in enumerate(shown):
        ax = axes[k // per_row, k % per_row]
        ax.imshow(thumbnail(issue.path))
        ax.set_title(f"#{k + 1} {_short(Path(issue.path).name, 24)}\ngiven: {_short(issue.given_label)}\n"
                     f"suggested: {_short(issue.suggested_label)} (quality {issue.score:.2f})", fontsize=8)
    more = f" ({len(issues)} flagged, {len(shown)} shown)" if len(issues) > len(shown) else ""
    fig.suptitle(f"Photos whose label is likely wrong, most suspect first{more}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
