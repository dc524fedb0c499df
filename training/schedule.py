"""How long a run trains and at what learning rate, chosen from the run itself.

The adaptive schedule (the default, `epochs` 0) is warm-up, stable, decay (WSD: Hägele et al. 2024, "Scaling Laws
and Compute-Optimal Training Beyond Fixed Training Durations", matches a cosine of the right length without
knowing the length in advance):

- warm-up: linear over `warmup_epochs` of the first full-phase epoch(s);
- stable: the peak learning rate for as long as validation improves: a new lowest loss (by at least
  LOSS_MIN_DELTA of it) or a new best top-1 within the last `patience` epochs;
- decay: once it stops improving (or `max_epochs`, or the time budget, leaves only room for it), a cosine to
  zero over DECAY_SHARE of the epochs so far (at least MIN_DECAY_EPOCHS), then the run ends.

A set that needs many steps gets them (validation keeps improving), one that learns fast stops early; no
epoch count to guess. The decisions are a function of the history rows, where each row records the schedule
it left (`decay_start`, `decay_steps`), so a resumed run continues the same schedule.

With `epochs` N > 0 the run has a fixed length: `fixed_factor`, a warm-up and cosine per phase over N epochs.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

# A loss gain smaller than this share of the best loss is noise on a few hundred validation photos (one photo
# of 262 moving from 0.6 to 0.4 confidence changes the mean loss by ~0.2%), not learning.
LOSS_MIN_DELTA = 0.01
# WSD's decay takes 10-20% of the run at language-model scale; here the runs are tens of epochs, and a decay of
# a quarter of the epochs so far (at least two) is what gives the annealing gain a whole epoch of steps or more.
DECAY_SHARE = 0.25
MIN_DECAY_EPOCHS = 2
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
    head_epochs: int  # head-only epochs first, each phase its own warm-up and (for the head) cosine
    warmup_epochs: float
    patience: int
    max_epochs: int
    time_budget_s: float | None = None
    decay_start: int | None = None  # optimizer step at which the decay began
    decay_steps: int = 0

    @property
    def head_steps(self) -> int:
        return self.head_epochs * self.steps_per_epoch

    def factor(self, step: int) -> float:
        if step < self.head_steps:
            return _warm_cosine(step, self.head_steps, min(int(self.warmup_epochs * self.steps_per_epoch),
                                                           self.head_steps // 2))
        if self.decay_start is not None and step >= self.decay_start:
            return 0.5 * (1.0 + math.cos(math.pi * min((step - self.decay_start) / max(1, self.decay_steps), 1.0)))
        warm = max(1, int(self.warmup_epochs * self.steps_per_epoch))
        t = step - self.head_steps
        return (t + 1) / (warm + 1) if t < warm else 1.0

    def state(self) -> dict[str, Any]:
        return {"decay_start": self.decay_start, "decay_steps": self.decay_steps}

    def restore(self, history: list[dict[str, Any]]) -> None:
        """The schedule an interrupted run had left after its last completed epoch."""
        if history:
            self.decay_start = history[-1].get("decay_start")
            self.decay_steps = history[-1].get("decay_steps", 0)

    def after_epoch(self, history: list[dict[str, Any]], step: int, elapsed_s: float,
                    epoch_s: float) -> tuple[bool, str]:
        """After the epoch that ended at optimizer `step` (history includes its row): (stop now?, why; "" when
        nothing changed). Starts the decay when validation has stopped improving or the limits leave only room for
        it; stops when the decay is over or the time budget has no room for another epoch."""
        epoch = len(history)
        if self.decay_start is not None:
            if step >= self.decay_start + self.decay_steps:
                return True, f"the decay ended after epoch {epoch}"
            return False, ""
        if epoch < self.head_epochs:
            return False, ""
        decay_epochs = max(MIN_DECAY_EPOCHS, math.ceil(DECAY_SHARE * epoch))
        reason = ""
        stalled = stalled_for(history[self.head_epochs:])
        if self.patience and stalled >= self.patience:
            reason = (f"validation stopped improving (no new lowest loss or best top-1 for {stalled} epochs): "
                      f"decaying over {_epochs(decay_epochs)}")
        if not reason and epoch + decay_epochs >= self.max_epochs:
            decay_epochs = max(1, self.max_epochs - epoch)
            reason = f"max_epochs {self.max_epochs} leaves room for the decay only: decaying over {_epochs(decay_epochs)}"
        if self.time_budget_s is not None:
            room = int((self.time_budget_s * (1 - AFTER_TRAINING_SHARE) - elapsed_s) // max(epoch_s, 1e-9))
            if room < 1:
                return True, (f"the time budget ({self.time_budget_s / 60:.1f} min) has no room for another epoch of "
                              f"{epoch_s:.0f} s")
            if room <= decay_epochs:
                decay_epochs = room
                reason = (f"the time budget ({self.time_budget_s / 60:.1f} min, {elapsed_s / 60:.1f} spent, epochs of "
                          f"{epoch_s:.0f} s) leaves room for {room} more: decaying over them")
        if reason:
            self.decay_start, self.decay_steps = step, decay_epochs * self.steps_per_epoch
        return False, reason


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def stalled_for(rows: list[dict[str, Any]]) -> int:
    """Epochs since the last that improved on every earlier one: a loss lower by LOSS_MIN_DELTA of the best,
    or a higher top-1."""
    best_loss, best_top1, since = float("inf"), -1.0, 0
    for row in rows:
        loss, top1 = row["val_loss"], row["val_top1"]
        if loss < best_loss * (1 - LOSS_MIN_DELTA) or top1 > best_top1:
            since = 0
        else:
            since += 1
        best_loss, best_top1 = min(best_loss, loss), max(best_top1, top1)
    return since
