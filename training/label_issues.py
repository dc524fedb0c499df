"""Photos whose given label is likely wrong: cleanlab on out-of-sample probabilities from a linear probe.

The probabilities come from a logistic regression on a network's frozen, globally pooled features, fitted by
stratified k-fold cross-validation, so that each photo is scored by a model that never saw its label (what
cleanlab's confident learning needs). cleanlab (`cleanlab.filter.find_label_issues`, pruning by noise rate)
decides which photos are issues; each is ranked by its label quality score (the out-of-sample probability of
its given label, `self_confidence`), lowest first. A linear probe on a few thousand photos fits in seconds on a
CPU; the features are the expensive part and come from one inference pass (training/diagnostics.py).
"""
from __future__ import annotations

import csv
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAX_FOLDS = 5
CSV_COLUMNS = ("path", "given_label", "suggested_label", "score")


@dataclass(frozen=True)
class LabelIssue:
    path: str
    given_label: str
    suggested_label: str  # the class the probe gives the highest out-of-sample probability
    score: float  # label quality in [0, 1]: the out-of-sample probability of the given label; low = suspect


def out_of_sample_probs(features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0) -> np.ndarray:
    """features float (N, K), labels int (N,) -> float64 (N, num_classes): each row predicted by a logistic
    regression (on unit-length features) fitted on the other folds of a stratified k-fold split, k = min(5, the
    smallest class's photos). ValueError when a class has fewer than 2 photos (nothing to hold out)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    counts = np.bincount(labels, minlength=num_classes)
    present = counts[counts > 0]
    if len(present) < 2:
        raise ValueError(f"label issues need at least 2 classes with photos, got {len(present)}")
    folds = int(min(MAX_FOLDS, present.min()))
    if folds < 2:
        raise ValueError(f"label issues need at least 2 photos in every class (cross-validation holds photos "
                         f"out); classes' photo counts: {counts.tolist()}")
    # Unit-length features (their direction, not their scale), lightly regularised: standardising every one of
    # the K dimensions instead gave the noisy ones the weight of the informative ones, and ranked ordinary
    # photos above swapped ones (tests/test_label_issues.py's set: 1-3 of 4 swapped in the top 4, against 4).
    probe = make_pipeline(Normalizer(), LogisticRegression(max_iter=2000, C=10.0))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's convergence chatter: a probe that stops early still ranks
        probs = cross_val_predict(probe, features, labels, cv=cv, method="predict_proba")  # (N, classes present)
    if probs.shape[1] == num_classes:
        return probs
    full = np.zeros((len(labels), num_classes))  # classes without photos get probability 0
    full[:, np.flatnonzero(counts > 0)] = probs
    return full


def find_label_issues(features: np.ndarray, labels: np.ndarray, paths: list[str], classes: list[str],
                      seed: int = 0) -> list[LabelIssue]:
    """The photos cleanlab flags as likely mislabelled, most suspect (lowest label quality) first."""
    import cleanlab.filter
    import cleanlab.rank

    labels = np.asarray(labels, dtype=np.int64)
    probs = out_of_sample_probs(np.asarray(features, dtype=np.float64), labels, len(classes), seed)
    present = np.flatnonzero(np.bincount(labels, minlength=len(classes)) > 0)
    # cleanlab wants every column to be a class with photos: drop the empty ones, map the labels onto the rest.
    remap = {c: i for i, c in enumerate(present)}
    local = np.array([remap[c] for c in labels])
    local_probs = probs[:, present]
    local_probs = local_probs / local_probs.sum(axis=1, keepdims=True)
    # n_jobs=1: cleanlab's worker pool reads globals set before it forks, and under the spawn start method (a
    # torchrun rank, a process started by multiprocessing's spawn) they are missing: NameError
    # 'pred_probs_by_class'. The result is the same for any n_jobs (cleanlab's docs); one process is plenty here.
    flagged = cleanlab.filter.find_label_issues(local, local_probs, return_indices_ranked_by="self_confidence",
                                                n_jobs=1)
    quality = cleanlab.rank.get_label_quality_scores(local, local_probs, method="self_confidence")
    log.info("label issues: %d of %d photos flagged (cleanlab on %d-fold out-of-sample probabilities)",
             len(flagged), len(labels), min(MAX_FOLDS, int(np.bincount(local).min())))
    return [LabelIssue(paths[i], classes[labels[i]], classes[present[int(local_probs[i].argmax())]], float(quality[i]))
            for i in flagged]


def write_label_issues_csv(issues: list[LabelIssue], path: Path) -> Path:
    """label_issues.csv: path,given_label,suggested_label,score, most suspect first (score = label quality)."""
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for issue in issues:
            w.writerow([issue.path, issue.given_label, issue.suggested_label, f"{issue.score:.6f}"])
    return Path(path)
