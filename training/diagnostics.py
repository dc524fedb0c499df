"""What a run (or `tuneserve inspect`) writes to answer "is it my labels or my model?".

- top_losses.png: the validation photos the model is most confidently wrong about, each beside the predicted
  class's activation map over it (training/cam.py, drawn by models/explain.py).
- label_issues.csv + label_issues.png: photos whose given label is likely wrong (training/label_issues.py:
  cleanlab on a cross-validated linear probe over the network's frozen pooled features).

One PyTorch inference pass per photo set gives the pooled features and the logits (N x K and N x C floats:
the activation maps, N x C x h x w, are computed only for the few photos drawn).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from tuneserve.models.explain import overlay
from tuneserve.models.preprocessing import Preprocessing, decode
from tuneserve.models.runtime import softmax
from tuneserve.training.cam import CamModel, feature_grid, head_logits
from tuneserve.training.data import Sample
from tuneserve.training.gallery import Mistake, plot_label_issues, plot_top_losses
from tuneserve.training.label_issues import find_label_issues, write_label_issues_csv
from tuneserve.training.loaders import EvalTransform, ImageDataset

log = logging.getLogger(__name__)

TOP_LOSSES = 8  # mistakes drawn in top_losses.png
FILES = ("top_losses.png", "label_issues.csv", "label_issues.png")


@dataclass
class Network:
    """A network ready for inference, and what its outputs mean."""
    model: nn.Module  # eval mode, on `device`
    arch: str
    pp: Preprocessing
    labels: list[str]  # the head's classes, in its order
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@torch.no_grad()
def infer(net: Network, paths: list[str], batch_size: int = 32, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Photos -> (pooled features float32 (N, K), logits float32 (N, C)), through the eval transform."""
    dataset = ImageDataset([Sample(p, 0) for p in paths], net.pp, EvalTransform(net.pp))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    features, logits = [], []
    for x, _ in loader:
        f = feature_grid(net.model, net.arch, x.to(net.device))  # (B, K, h, w)
        features.append(f.mean(dim=(2, 3)).float().cpu())
        logits.append(head_logits(net.model, net.arch, f).float().cpu())
    if not features:
        return np.zeros((0, 0), np.float32), np.zeros((0, len(net.labels)), np.float32)
    return torch.cat(features).numpy(), torch.cat(logits).numpy()


@torch.no_grad()
def activation_maps(net: Network, paths: list[str]) -> np.ndarray:
    """Photos -> float32 (N, C, h, w) class activation maps (a handful of photos: N x C x h x w floats)."""
    x = torch.stack([EvalTransform(net.pp)(decode(p, net.pp)) for p in paths]).to(net.device)
    return CamModel(net.model, net.arch)(x)[1].float().cpu().numpy()


def confident_mistakes(logits: np.ndarray, labels: np.ndarray, n: int = TOP_LOSSES) -> list[int]:
    """logits (N, C), true label indices (N,) -> indices of up to `n` misclassified photos, the highest
    predicted-class probability first."""
    probs = softmax(logits.astype(np.float64))
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    return [int(i) for i in wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:n]]


def write_top_losses(net: Network, paths: list[str], labels: np.ndarray, logits: np.ndarray, path: Path) -> Path:
    """top_losses.png for photos `paths` with true label indices `labels` (into net.labels) and their logits."""
    chosen = confident_mistakes(logits, labels)
    probs = softmax(logits.astype(np.float64))
    cams = activation_maps(net, [paths[i] for i in chosen]) if chosen else None
    mistakes = []
    for k, i in enumerate(chosen):
        predicted = int(probs[i].argmax())
        mistakes.append(Mistake(paths[i], net.labels[labels[i]], net.labels[predicted], float(probs[i, predicted]),
                                overlay(decode(paths[i], net.pp), cams[k, predicted], net.pp, max_side=320)))
    return plot_top_losses(mistakes, path)


def write_label_issues(features: np.ndarray, paths: list[str], labels: np.ndarray, classes: list[str],
                       out_dir: Path, seed: int = 0) -> list:
    """label_issues.csv and label_issues.png in `out_dir`; returns the issues, most suspect first."""
    issues = find_label_issues(features, labels, paths, classes, seed)
    write_label_issues_csv(issues, out_dir / "label_issues.csv")
    plot_label_issues(issues, out_dir / "label_issues.png")
    return issues


def run_diagnostics(net: Network, classes: list[str], train: list[Sample], val: list[Sample], out_dir: Path,
                    batch_size: int = 32, workers: int = 0, seed: int = 0) -> dict[str, Path]:
    """After training: top_losses.png from `val`, label issues among `train` (labels index `classes`, which
    are net.labels). Returns the files written."""
    written: dict[str, Path] = {}
    if val:
        _, logits = infer(net, [s.path for s in val], batch_size, workers)
        labels = np.array([s.label for s in val])
        written["top_losses.png"] = write_top_losses(net, [s.path for s in val], labels, logits,
                                                     out_dir / "top_losses.png")
    features, _ = infer(net, [s.path for s in train], batch_size, workers)
    try:
        write_label_issues(features, [s.path for s in train], np.array([s.label for s in train]), classes, out_dir,
                           seed)
    except ValueError as e:  # too few photos in a class to hold any out: said, not a failure of the run
        log.warning("no label issues for this run: %s", e)
        return written
    written["label_issues.csv"] = out_dir / "label_issues.csv"
    written["label_issues.png"] = out_dir / "label_issues.png"
    return written


def stored_network(tag: str | None, device: str = "cpu") -> tuple[Network, str]:
    """The network whose features `inspect` uses: the registered model `tag` (its kept PyTorch weights), or
    with None the built-in ImageNet model's (shipped offline). Returns (network, what it is, for messages)."""
    from tuneserve.models.architectures import DEFAULT_ARCH, get_architecture, imagenet_labels
    from tuneserve.models.weights import build_model

    if tag is None:
        model = build_model(DEFAULT_ARCH, 1000, "imagenet")
        net = Network(model, DEFAULT_ARCH, get_architecture(DEFAULT_ARCH).preprocessing, list(imagenet_labels()))
        what = f"ImageNet {DEFAULT_ARCH} (built in)"
    else:
        from tuneserve.models.store import load_model
        from tuneserve.training.export import load_weights

        stored = load_model(tag)
        model = build_model(stored.card.arch, stored.card.num_classes, "none")
        model.load_state_dict(load_weights(stored))
        net = Network(model, stored.card.arch, stored.card.preprocessing, list(stored.card.labels))
        what = stored.tag
    net.device = torch.device(device)
    net.model = net.model.float().eval().to(net.device)
    return net, what


def labelled_photos(data: str) -> tuple[list[str], list[Sample], int]:
    """DATA/<class>/* (DATA/train/<class>/* and DATA/val/<class>/* together, when both exist) -> (classes,
    readable photos as Samples, unreadable files skipped)."""
    from tuneserve.training.data import DataError, probe_image, scan_class_folders

    root = Path(data)
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist or is not a folder")
    folders = [root / "train", root / "val"] if (root / "train").is_dir() and (root / "val").is_dir() else [root]
    pairs = [pair for folder in folders for pair in scan_class_folders(folder)]
    classes = sorted({c for _, c in pairs})
    if len(classes) < 2:
        raise DataError(f"{data} has {len(classes)} class folder(s); finding label issues needs at least 2")
    usable = [Sample(str(p), classes.index(c)) for p, c in pairs if probe_image(str(p)) is None]
    return classes, usable, len(pairs) - len(usable)


def inspect_folder(data: str, tag: str | None = None, output_dir: str | Path = ".", device: str = "auto",
                   batch_size: int = 32, workers: int = 0) -> dict:
    """`tuneserve inspect`: label_issues.csv and label_issues.png for every photo of `data` (its class folders
    are the given labels), from the features of `tag` (default: the built-in model); top_losses.png too when
    the model's classes include the folder's. Returns a summary: files, photos, skipped, issues, model."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    classes, samples, skipped = labelled_photos(data)
    net, what = stored_network(tag, device)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [s.path for s in samples]
    labels = np.array([s.label for s in samples])
    log.info("inspecting %d photos of %d classes with %s's features", len(paths), len(classes), what)
    features, logits = infer(net, paths, batch_size, workers)
    issues = write_label_issues(features, paths, labels, classes, out)
    files = [out / "label_issues.csv", out / "label_issues.png"]
    if set(classes) <= set(net.labels):  # the model knows these classes: its own mistakes are worth a look
        index = {c: i for i, c in enumerate(net.labels)}
        files.append(write_top_losses(net, paths, np.array([index[classes[y]] for y in labels]), logits,
                                      out / "top_losses.png"))
    return {"files": files, "photos": len(paths), "skipped": skipped, "issues": issues, "model": what}


def after_training(checkpoint: Path, classes: list[str], train: list[Sample], val: list[Sample], device: torch.device,
                   batch_size: int = 32, workers: int = 0, seed: int = 0) -> dict[str, Path]:
    """The end of every run (rank 0): run_diagnostics with the best checkpoint's weights, into its run folder.
    A failure here is logged and costs the run nothing: the model is trained and registered by then."""
    from tuneserve.models.preprocessing import Preprocessing
    from tuneserve.models.weights import build_model
    from tuneserve.training import checkpoint as ckpt_io

    try:
        best = ckpt_io.load(checkpoint)
        model = build_model(best["arch"], len(best["classes"]), "none")
        model.load_state_dict(ckpt_io.deployed_weights(best))
        net = Network(model.float().eval().to(device), best["arch"], Preprocessing.from_dict(best["preprocessing"]),
                      list(classes), device)
        written = run_diagnostics(net, classes, train, val, Path(checkpoint).parent, batch_size, workers, seed)
        log.info("wrote %s in %s", ", ".join(written), Path(checkpoint).parent)
        return written
    except Exception:  # noqa: BLE001 - diagnostics must never fail a run whose model is already registered
        log.exception("the run's top losses and label issues could not be computed")
        return {}
