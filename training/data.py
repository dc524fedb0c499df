"""Finding, checking and loading labelled images.

Layouts: DATA/train/<class>/* + DATA/val/<class>/*; or DATA/<class>/* split per class by `val_fraction`
with a fixed seed; or a CSV manifest of `path,label` rows. Every file is decoded once up front (JPEGs in
PIL's fast draft mode); unreadable ones are listed with the reason and skipped. Problems that would make
training meaningless (no images, one class, too few images in a class, a validation class never seen in
training) stop with a DataError before any training starts.
"""
from __future__ import annotations

import json

import csv
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tuneserve.models.preprocessing import SUPPORTED_FORMATS, ImageDecodeError, load_image

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The dataset cannot be trained on; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


@dataclass
class Dataset:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    layout: str = ""

    def counts(self, split: str) -> list[int]:
        counts = [0] * len(self.classes)
        for s in getattr(self, split):
            counts[s.label] += 1
        return counts


def fingerprint(ds: Dataset) -> str:
    """A short hash of what a model learnt from: the classes, and every train and val image's file name, size
    and label (not the folder it lives in, so the same photos elsewhere give the same fingerprint)."""
    import hashlib

    h = hashlib.sha256(json.dumps(ds.classes).encode())
    for split in ("train", "val"):
        for s in sorted(getattr(ds, split), key=lambda s: (Path(s.path).name, s.label)):
            p = Path(s.path)
            h.update(f"{split}\t{p.name}\t{p.stat().st_size if p.exists() else -1}\t{s.label}\n".encode())
    return h.hexdigest()[:16]


def discover(data: str, manifest: str | None, val_fraction: float, seed: int, min_images_per_class: int) -> Dataset:
    """Scan, check and split the dataset described by the arguments (see the module docstring)."""
    root = Path(data)
    if manifest:
        pairs = _read_manifest(Path(manifest))
        ds = _split(pairs, val_fraction, seed, layout=f"manifest {manifest}")
    else:
        if not root.is_dir():
            raise DataError(f"data folder {str(root)!r} does not exist or is not a folder")
        if (root / "train").is_dir() and (root / "val").is_dir():
            train_pairs = scan_class_folders(root / "train")
            val_pairs = scan_class_folders(root / "val")
            classes = sorted({label for _, label in train_pairs})
            unseen = sorted({label for _, label in val_pairs} - set(classes))
            if unseen:
                raise DataError(
                    f"validation classes {unseen} have no training folder in {root / 'train'}; "
                    f"training classes are {classes}"
                )
            ds = Dataset(classes, _to_samples(train_pairs, classes), _to_samples(val_pairs, classes),
                         layout=f"{root}/train + {root}/val")
        else:
            ds = _split(scan_class_folders(root), val_fraction, seed, layout=f"{root} split {val_fraction:.0%} for validation")
    _check_images(ds)
    _check_sizes(ds, min_images_per_class)
    return ds


def scan_class_folders(folder: Path) -> list[tuple[Path, str]]:
    # Hidden folders and the __MACOSX folder macOS zips unpack to (its ._ files are metadata) are not classes.
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")
    if not class_dirs:
        raise DataError(
            f"{folder} has no class subfolders; expected {folder}/<class name>/<images> "
            f"(or {folder}/train/<class>/... and {folder}/val/<class>/...)"
        )
    pairs, empty = [], []
    for d in class_dirs:
        files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        pairs.extend((p, d.name) for p in files)
        if not files:
            empty.append(d.name)
    if empty:  # a class the user meant to have: dropping it silently would train a model without it
        raise DataError(f"class folders with no files in {folder}: {empty}; add images to them or remove them")
    return pairs


def _read_manifest(path: Path) -> list[tuple[Path, str]]:
    if not path.is_file():
        raise DataError(f"manifest {str(path)!r} does not exist")
    pairs = []
    with path.open(newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or row[0].startswith("#"):
                continue
            if lineno == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
                continue  # header
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"{path}:{lineno}: expected 'path,label', got {row!r}")
            p = Path(row[0].strip())
            pairs.append((p if p.is_absolute() else path.parent / p, row[1].strip()))
    if not pairs:
        raise DataError(f"manifest {path} lists no images")
    return pairs


def _to_samples(pairs: list[tuple[Path, str]], classes: list[str]) -> list[Sample]:
    index = {c: i for i, c in enumerate(classes)}
    return [Sample(str(p), index[label]) for p, label in pairs]


def _split(pairs: list[tuple[Path, str]], val_fraction: float, seed: int, layout: str) -> Dataset:
    """Stratified split: each class keeps round(n * val_fraction) images (at least 1) for validation."""
    classes = sorted({label for _, label in pairs})
    by_class: dict[str, list[Path]] = {c: [] for c in classes}
    for p, label in pairs:
        by_class[label].append(p)
    rng = random.Random(seed)
    train, val = [], []
    for c in classes:
        paths = sorted(by_class[c])
        rng.shuffle(paths)
        n_val = min(max(1, round(len(paths) * val_fraction)), len(paths) - 1) if len(paths) > 1 else 0
        val += [(p, c) for p in paths[:n_val]]
        train += [(p, c) for p in paths[n_val:]]
    return Dataset(classes, _to_samples(train, classes), _to_samples(val, classes), layout=layout)


def probe_image(path: str) -> str | None:
    """None if `path` decodes as a supported image, else the reason it does not."""
    try:
        load_image(path, draft_size=64)
    except ImageDecodeError as e:
        return str(e)
    except OSError as e:  # unreadable file (permissions, vanished)
        return f"cannot read file: {e}"
    return None


def _check_images(ds: Dataset) -> None:
    """Decode every image once (in threads: PIL releases the GIL) and drop the ones that fail."""
    all_samples = ds.train + ds.val
    with ThreadPoolExecutor(max_workers=8) as pool:
        reasons = dict(zip((s.path for s in all_samples), pool.map(probe_image, (s.path for s in all_samples))))
    bad = {p: r for p, r in reasons.items() if r is not None}
    if bad:
        ds.train = [s for s in ds.train if s.path not in bad]
        ds.val = [s for s in ds.val if s.path not in bad]
        ds.skipped = sorted(bad.items())
        log.warning("skipping %d unusable file(s):", len(bad))
        for p, r in ds.skipped:
            log.warning("  %s: %s", p, r)


def _check_sizes(ds: Dataset, min_images_per_class: int) -> None:
    if not ds.train:
        raise DataError(
            f"no usable training images in {ds.layout} "
            f"({len(ds.skipped)} file(s) skipped; supported formats: {', '.join(SUPPORTED_FORMATS)})"
        )
    if len(ds.classes) < 2:
        raise DataError(f"found only the class {ds.classes} in {ds.layout}; a classifier needs at least 2 classes")
    counts = ds.counts("train")
    small = {c: n for c, n in zip(ds.classes, counts) if n < min_images_per_class}
    if small:
        raise DataError(
            f"classes with fewer than {min_images_per_class} usable training images: {small}; "
            "add images, remove the class folder, or lower --min-images-per-class"
        )
    if not ds.val:
        raise DataError(f"no validation images in {ds.layout}; add a val/ folder or more images per class")
