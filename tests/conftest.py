"""Shared fixtures. Every test session gets its own BentoML home, so tests never touch the user's store."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Before anything imports bentoml: it reads BENTOML_HOME once.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="tuneserve-test-bentoml-")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

HYMENOPTERA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "hymenoptera"


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    if not (HYMENOPTERA / "train").is_dir():
        pytest.skip(f"real dataset not found at {HYMENOPTERA} (it lives in ../shared beside the checkout)")
    return HYMENOPTERA


def hymenoptera_subset(hymenoptera: Path, root: Path, train: int, val: int) -> Path:
    """root/{train,val}/{ants,bees}/: the first `train` / `val` photos of each class, copied (sorted by name)."""
    import shutil

    for split, n in (("train", train), ("val", val)):
        for cls in ("ants", "bees"):
            (root / split / cls).mkdir(parents=True)
            for src in sorted((hymenoptera / split / cls).glob("*.jpg"))[:n]:
                shutil.copy(src, root / split / cls / src.name)
    return root


def write_image(path: Path, seed: int, size=(40, 32), fmt: str | None = None) -> Path:
    """A small random RGB PNG/JPEG (format from the suffix unless given); content depends on the seed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    arr = np.clip(base + rng.integers(-20, 20, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """3 classes (an odd count, as timm's tests like), 6 images each, no train/val split: data/<class>/*.png."""
    root = tmp_path / "data"
    for c, cls in enumerate(["alpha", "beta", "gamma"]):
        for i in range(6):
            write_image(root / cls / f"{i}.png", seed=c * 100 + i)
    return root
