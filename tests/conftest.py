"""Shared fixtures (plain helpers are in support.py). Every test session gets its own BentoML home, so tests
never touch the user's store."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest


def _session_folder(prefix: str) -> str:
    """A temporary folder for this process's session, removed when it exits (a session's store holds models
    and Bentos: 0.3-1.2 GB each, left behind run after run otherwise)."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


# Before anything imports bentoml: it reads BENTOML_HOME once.
os.environ["BENTOML_HOME"] = _session_folder("tuneserve-test-bentoml-")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
# prometheus_client picks its multi-process mode when first imported; `bentoml serve` sets this variable for its
# workers, and the in-process BentoML app in tests/test_service_http.py needs one too.
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _session_folder("tuneserve-test-prometheus-")

from shared_data import HYMENOPTERA  # noqa: E402  (benchmarks/, on pytest's pythonpath)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Run by pytest-xdist (`-n 2`): each worker's in-process torch work on one thread, so two workers share two
    # cores instead of four spinning OpenMP threads taking turns. Subprocesses (servers, torchrun) are unchanged.
    import torch

    torch.set_num_threads(1)

from support import (QUICK_EXPORT, Ranks, builtin_model, hymenoptera_subset, standin_hymenoptera,  # noqa: E402
                     write_image)


@pytest.fixture(scope="session")
def hymenoptera(tmp_path_factory) -> Path:
    """The real hymenoptera photos ({train,val}/{ants,bees}/*.jpg) where ../shared/datasets is beside the
    checkout (or $TUNESERVE_DATASETS names it); elsewhere a stand-in with the same layout, cut from real sample
    photos (support.standin_hymenoptera), so no test skips for want of it."""
    if (HYMENOPTERA / "train").is_dir():
        return HYMENOPTERA
    return standin_hymenoptera(tmp_path_factory.mktemp("hymenoptera"))


@pytest.fixture(scope="session")
def model():
    """The built-in ImageNet model (EfficientNet-Lite0, 1000 classes), registered in this session's store."""
    return builtin_model()


@pytest.fixture(scope="module")
def ranks():
    """Two rank processes for this module's tests (support.Ranks)."""
    pool = Ranks(2)
    yield pool
    pool.close()


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """3 classes (an odd count, as timm's tests like), 6 images each, no train/val split: data/<class>/*.png."""
    root = tmp_path / "data"
    for c, cls in enumerate(["alpha", "beta", "gamma"]):
        for i in range(6):
            write_image(root / cls / f"{i}.png", seed=c * 100 + i)
    return root


@pytest.fixture(scope="session")
def ants_bees(hymenoptera, tmp_path_factory):
    """(model, run folder): a 1-epoch fine-tune on 10 + 6 real photos per class of hymenoptera, registered as
    "e2e-hym" (2 classes: ants, bees)."""
    from tuneserve.training.config import TrainConfig
    from tuneserve.training.train import train

    root = hymenoptera_subset(hymenoptera, tmp_path_factory.mktemp("hym-subset"), 10, 6)
    result = train(TrainConfig(data=str(root), epochs=1, head_epochs=1, batch_size=8, loader_workers=0,
                               name="e2e-hym", output_dir=str(root / "runs"), parity_images=8, diagnostics=False,
                               **QUICK_EXPORT))
    assert result.model is not None
    return result.model, result.run_dir


@pytest.fixture(scope="session")
def two_tones(tmp_path_factory):
    """Another fine-tuned model, made without ../shared: 1 epoch on small generated images of 2 classes,
    registered as "tones" (dark, light), for tests that serve several models."""
    from tuneserve.training.config import TrainConfig
    from tuneserve.training.train import train

    root = tmp_path_factory.mktemp("tones") / "data"
    for c, cls in enumerate(["dark", "light"]):
        for i in range(8):
            write_image(root / cls / f"{i}.png", seed=500 + c * 100 + i, size=(48, 40))
    result = train(TrainConfig(data=str(root), epochs=1, head_epochs=1, batch_size=8, loader_workers=0,
                               name="tones", output_dir=str(root.parent / "runs"), parity_images=4, diagnostics=False,
                               **QUICK_EXPORT))
    assert result.model is not None
    return result.model


@pytest.fixture(scope="session")
def three_shades(tmp_path_factory):
    """A second fine-tuned model with other classes: 1 epoch on small generated images of 3 colours,
    registered as "shades" (alpha, beta, gamma)."""
    from tuneserve.training.config import TrainConfig
    from tuneserve.training.train import train

    root = tmp_path_factory.mktemp("shades") / "data"
    for c, cls in enumerate(["alpha", "beta", "gamma"]):
        for i in range(8):
            write_image(root / cls / f"{i}.png", seed=c * 100 + i, size=(48, 40))
    result = train(TrainConfig(data=str(root), epochs=1, head_epochs=1, batch_size=8, loader_workers=0,
                               name="shades", output_dir=str(root.parent / "runs"), parity_images=4, **QUICK_EXPORT))
    assert result.model is not None
    return result.model


@pytest.fixture
def offline_torch_hub(tmp_path: Path, monkeypatch) -> list[str]:
    """torch's hub cache in an empty folder (TORCH_HOME) and every download refused, as on a machine without
    network, whether or not this one has it. Returns the URLs that were asked for."""
    import urllib.error

    import torch.hub

    asked: list[str] = []

    def refuse(url: str, *args, **kwargs) -> None:
        asked.append(url)
        raise urllib.error.URLError("downloads are blocked in this test")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return asked
