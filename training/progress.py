"""Where a run stands: epochs done, the best epoch so far, early-stopping count and the per-epoch history.

Saved in last.pt with the model and optimizer, so a resumed run continues with the same best epoch and
patience as the interrupted one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def is_better(top1: float, loss: float, best_top1: float, best_loss: float) -> bool:
    """The best epoch's rule: the higher validation top-1, the lower loss on a tie."""
    return top1 > best_top1 or (top1 == best_top1 and loss < best_loss)


def best_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The best of history rows (with val_top1 and val_loss) by `is_better`; the first of equals."""
    best = rows[0]
    for row in rows[1:]:
        if is_better(row["val_top1"], row["val_loss"], best["val_top1"], best["val_loss"]):
            best = row
    return best


@dataclass
class Progress:
    epoch: int = 0  # epochs completed
    best_top1: float = -1.0
    best_loss: float = float("inf")  # validation loss of the best epoch: breaks top-1 ties
    best_epoch: int = 0
    since_best: int = 0  # epochs without improvement, for early stopping
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch (training/train.py)
    probe: dict[str, Any] | None = None  # the linear probe's row ("epoch" 0), the first model to beat

    def offer_probe(self, row: dict[str, Any]) -> None:
        """The frozen backbone with a fitted head, judged before any training: the best model until an epoch
        beats it (epoch 0)."""
        self.probe = row
        self.best_top1, self.best_loss, self.best_epoch = row["val"]["top1"], row["val"]["loss"], 0

    def record(self, row: dict[str, Any]) -> bool:
        """Add epoch `row` (with its validation metrics under "val"); True when it is the new best."""
        val = row["val"]
        self.history.append(row)
        self.epoch = row["epoch"]
        improved = is_better(val["top1"], val["loss"], self.best_top1, self.best_loss)
        if improved:
            self.best_top1, self.best_loss, self.best_epoch, self.since_best = val["top1"], val["loss"], self.epoch, 0
        else:
            self.since_best += 1
        return improved

    @property
    def best_row(self) -> dict[str, Any]:
        if self.best_epoch == 0 and self.probe is not None:
            return self.probe
        return next(r for r in self.history if r["epoch"] == self.best_epoch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> "Progress":
        return cls(**{f.name: ckpt[f.name] for f in dataclasses.fields(cls) if f.name in ckpt})
