"""How long a run trains and at what learning rate, chosen from the run itself.

The adaptive schedule (the default, `epochs` 0) runs a first cycle of FIRST_CYCLE_EPOCHS, the recipe measured on
seven kinds of photo set (head-only epochs, then everything, each phase a warm-up and a cosine to zero, early
stop after `patience` epochs without a better validation top-1), then asks whether the run was still learning
when it ended: a new best validation top-1 in the cycle's last LATE_EPOCHS epochs, short of 100%. If so it trains another cycle (a warm restart, as SGDR: Loshchilov &
Hutter 2017) of EXTENSION_SHARE of the first cycle's full-phase epochs at EXTENSION_PEAK of the learning rate,
and another after each that raised the best top-1, up to `max_epochs` and within the time budget. A set the first cycle suits trains exactly as
the fixed recipe did (same steps, same wall time); one still learning at its end gets more steps, as many as
keep paying. The decisions are a function of the history rows, where each row records the cycles so far, so a
resumed run continues the same schedule.

With `epochs` N > 0 the run has a fixed length: `fixed_factor`, a warm-up and cosine per phase over N epochs.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from tuneserve.training.progress import is_better

# The length of the recipe measured on hymenoptera, butterflies, aerial scenes and dominant-class sets
# (docs/benchmarks.md): the first cycle, which most sets need no more than.
FIRST_CYCLE_EPOCHS = 8
# "Still learning" = a better validation top-1 in the last LATE_EPOCHS of a cycle. Not a lower loss alone: the
# two extensions a loss 3.5-4% lower started (aerial scenes and butterflies at 64 px, docs/benchmarks.md "The
# adaptive schedule") moved top-1 by nothing, for 3 epochs each.
LATE_EPOCHS = 2
# Each extension: half the first cycle's full-phase epochs (3 of 6), and only one more after an extension that did
# not raise top-1, so a set whose accuracy it does not move costs at most 11 epochs for 8 (1.4x); at half the peak
# learning rate, since it restarts from a trained model rather than ImageNet's.
EXTENSION_SHARE = 0.5
EXTENSION_PEAK = 0.5
# Export (ONNX, parity gate, INT8 calibration) and the diagnostics after training take a share of a time
# budget: ~20 s of a 3.7 min run on hymenoptera (2 cores).
AFTER_TRAINING_SHARE = 0.1

_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)s)?\s*$")


def parse_duration(text: str) -> float:
    """'20m', '1h30m', '90s', '1.5h' -> seconds; ValueError naming the accepted forms."""
    m = _DURATION.match(text or "")
    if not text or not m or not any(m.groups()):
        raise ValueError(f"time budget {text!r} is not a duration; give a number with a unit: 90s, 20m, 1h30m, 1.5h")
    h, mins, s = (float(g) if g else 0.0 for g in m.groups())
    seconds = h * 3600 + mins * 60 + s
    if seconds <= 0:
        raise ValueError(f"time budget {text!r} must be longer than 0 s")
    return seconds


def _warm_cosine(t: int, length: int, warm: int) -> float:
    """Linear warm-up over `warm` steps, then a cosine from 1 to 0 over the rest of `length`."""
    if t < warm:
        return (t + 1) / (warm + 1)
    progress = (t - warm) / max(1, length - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def fixed_factor(step: int, steps_per_epoch: int, head_epochs: int, epochs: int, warmup_epochs: float) -> float:
    """Per optimizer step of a fixed-length run: each phase (head-only, then full) warms up linearly, then decays
    on a cosine to 0."""
    head_steps = head_epochs * steps_per_epoch
    total_steps = epochs * steps_per_epoch
    start, length = (0, head_steps) if step < head_steps else (head_steps, total_steps - head_steps)
    return _warm_cosine(step - start, length, min(int(warmup_epochs * steps_per_epoch), length // 2))


@dataclass
class Adaptive:
    """The adaptive schedule's state: the LR factor per optimizer step, and the decision after each epoch."""

    steps_per_epoch: int
    head_epochs: int  # of the first cycle
    warmup_epochs: float
    patience: int  # first cycle: stop after this many epochs without a better validation top-1
    max_epochs: int
    time_budget_s: float | None = None
    # Full-phase cycles after the head phase: [start step, length, warm-up steps, peak factor]; the first is
    # planned here, the others by after_epoch.
    cycles: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.cycles:
            length = (min(FIRST_CYCLE_EPOCHS, self.max_epochs) - self.head_epochs) * self.steps_per_epoch
            self.cycles = [[self.head_steps, length, self._warm(length), 1.0]]

    @property
    def head_steps(self) -> int:
        return self.head_epochs * self.steps_per_epoch

    @property
    def end_step(self) -> int:
        return int(self.cycles[-1][0] + self.cycles[-1][1])

    def _warm(self, length: int) -> int:
        return min(int(self.warmup_epochs * self.steps_per_epoch), length // 2)

    def factor(self, step: int) -> float:
        if step < self.head_steps:
            return _warm_cosine(step, self.head_steps, self._warm(self.head_steps))
        start, length, warm, peak = next(c for c in reversed(self.cycles) if step >= c[0])
        return peak * _warm_cosine(int(step - start), int(length), int(warm))

    def state(self) -> dict[str, Any]:
        return {"cycles": [list(c) for c in self.cycles]}

    def restore(self, history: list[dict[str, Any]]) -> None:
        """The schedule an interrupted run had left after its last completed epoch."""
        if history and history[-1].get("cycles"):
            self.cycles = [list(c) for c in history[-1]["cycles"]]

    def after_epoch(self, history: list[dict[str, Any]], step: int, elapsed_s: float,
                    epoch_s: float) -> tuple[bool, str]:
        """After the epoch that ended at optimizer `step` (history includes its row): (stop now?, why; "" when
        nothing changed)."""
        epoch = len(history)
        room = None
        if self.time_budget_s is not None:
            room = int((self.time_budget_s * (1 - AFTER_TRAINING_SHARE) - elapsed_s) // max(epoch_s, 1e-9))
            if room < 1:
                return True, (f"the time budget ({self.time_budget_s / 60:.1f} min) has no room for another epoch of "
                              f"{epoch_s:.0f} s")
        if step < self.end_step:
            if len(self.cycles) == 1 and self.patience and epochs_since_best(history) >= self.patience:
                return True, f"early stop: no better validation top-1 for {self.patience} epochs"
            left = -(-(self.end_step - step) // self.steps_per_epoch)
            if room is not None and room < left and step >= self.head_steps:
                # the rest of this cycle's cosine, compressed into the epochs the budget leaves
                self.cycles.append([step, room * self.steps_per_epoch, 0, self.factor(step)])
                return False, (f"the time budget ({self.time_budget_s / 60:.1f} min, {elapsed_s / 60:.1f} spent, "
                               f"epochs of {epoch_s:.0f} s) leaves room for {room} of the cycle's {left} epochs left: "
                               "decaying over them")
            return False, ""
        if len(self.cycles) == 1:
            learning, evidence = still_learning(history)
        else:
            learning, evidence = extension_paid(history, int(self.cycles[-1][1] // self.steps_per_epoch))
        if not learning:
            return True, f"cycle {len(self.cycles)} ended and validation {evidence}: done"
        length = max(1, math.ceil(EXTENSION_SHARE * (self.cycles[0][1] / self.steps_per_epoch)))
        length = min(length, self.max_epochs - epoch, room if room is not None else length)
        if length < 1:
            return True, f"validation {evidence}, but max_epochs {self.max_epochs} is reached"
        self.cycles.append([step, length * self.steps_per_epoch, self._warm(length * self.steps_per_epoch),
                            EXTENSION_PEAK])
        return False, (f"validation {evidence} at the end of cycle {len(self.cycles) - 1}: another cycle of "
                       f"{length} epoch{'s' if length > 1 else ''} at {EXTENSION_PEAK:g}x the learning rate")


def epochs_since_best(rows: list[dict[str, Any]]) -> int:
    """Epochs since the best one as training/progress.py picks it: the higher top-1, the lower loss on a tie."""
    best, since = (-1.0, float("inf")), 0
    for row in rows:
        better = is_better(row["val_top1"], row["val_loss"], *best)
        since = 0 if better else since + 1
        best = (row["val_top1"], row["val_loss"]) if better else best
    return since


def extension_paid(rows: list[dict[str, Any]], cycle_epochs: int) -> tuple[bool, str]:
    """(did the last cycle, of `cycle_epochs`, raise the run's best validation top-1?, in words). Only top-1 counts
    here: on aerial scenes at 64 px a second cycle lowered the loss 3.5% and left top-1 where it was, and a third
    would have cost 1.75x the first cycle's time for no gain."""
    before = max((r["val_top1"] for r in rows[:-cycle_epochs]), default=-1.0)
    after = max(r["val_top1"] for r in rows[-cycle_epochs:])
    if after > before:
        return True, f"improved its top-1 in the last cycle ({before:.3f} -> {after:.3f})"
    return False, f"did not improve its top-1 in the last cycle (best {before:.3f})"


def still_learning(rows: list[dict[str, Any]]) -> tuple[bool, str]:
    """(did validation top-1 improve in the last LATE_EPOCHS rows, short of 100%?, what it did, in words)."""
    before, late = rows[:-LATE_EPOCHS], rows[-LATE_EPOCHS:]
    best_top1 = max((r["val_top1"] for r in before), default=-1.0)
    if max(r["val_top1"] for r in rows) >= 1.0:
        return False, "is at 100% top-1"
    top1 = max(r["val_top1"] for r in late)
    if top1 > best_top1:
        return True, f"improved its top-1 in the last {LATE_EPOCHS} epochs ({best_top1:.3f} -> {top1:.3f})"
    return False, f"did not improve its top-1 in the last {LATE_EPOCHS} epochs"
