"""Artifacts in the BentoML model store: round trip, listing, integrity, and saves that fail or are killed at
any instant leave either the whole version or nothing."""
from __future__ import annotations

import dataclasses
import glob
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from tuneserve.models.artifact import ModelCard
from tuneserve.models.preprocessing import Preprocessing
from tuneserve.models.store import (
    STAGING_DIR,
    ModelIntegrityError,
    ModelNotFoundError,
    bentoml_home,
    list_models,
    load_model,
    models_root,
    prune,
    save_model,
    scan_store,
    validate_name,
    verify,
)


def _card(labels=("a", "b", "c")) -> ModelCard:
    return ModelCard(arch="resnet18", labels=list(labels), preprocessing=Preprocessing(), metrics={"val_top1": 0.5})


def test_save_load_list_roundtrip(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx-bytes")
    extra = tmp_path / "history.csv"
    extra.write_text("epoch\n1\n")
    stored = save_model("roundtrip", _card(), onnx, {"history.csv": extra})
    assert stored.tag.startswith("roundtrip:")
    loaded = load_model(stored.tag)
    assert dataclasses.replace(loaded.card, files={}) == _card() and loaded.onnx_path.read_bytes() == b"onnx-bytes"
    assert loaded.card.files["model.onnx"]["bytes"] == len(b"onnx-bytes")
    assert set(loaded.card.files) == {"model.onnx", "history.csv"}
    verify(loaded)
    assert (loaded.path / "history.csv").read_text() == "epoch\n1\n"
    assert load_model("roundtrip").tag == stored.tag  # name alone = latest version
    assert stored.tag in [m.tag for m in list_models()]


def test_failed_save_leaves_nothing(tmp_path):
    before = set(glob.glob(f"{tempfile.gettempdir()}/bentoml-model-broken-*"))
    with pytest.raises(FileNotFoundError):
        save_model("broken", _card(), tmp_path / "missing.onnx")
    with pytest.raises(ModelNotFoundError):
        load_model("broken")
    assert not [m for m in list_models() if m.tag.startswith("broken:")]
    assert set(glob.glob(f"{tempfile.gettempdir()}/bentoml-model-broken-*")) <= before


def test_unknown_tag_lists_known_models():
    with pytest.raises(ModelNotFoundError, match="'nope:v1' is not in the BentoML model store"):
        load_model("nope:v1")


@pytest.mark.parametrize("bad", ["", "Upper", "has space", "-dash-first", "x" * 64, "a/b"])
def test_bad_names_are_refused(bad):
    with pytest.raises(ValueError, match="is not valid"):
        validate_name(bad)


def test_card_refuses_unknown_format_version(tmp_path):
    card = _card()
    d = card.to_dict()
    d["format_version"] = 99
    with pytest.raises(ValueError, match="format_version 99"):
        ModelCard.from_dict(d)
    card.write(tmp_path)
    assert ModelCard.read(tmp_path) == card


def _register(name: str, tmp_path, payload: bytes = b"graph") -> str:
    onnx = tmp_path / f"{name}.onnx"
    onnx.write_bytes(payload)
    return save_model(name, _card(), onnx).tag


def test_a_damaged_file_is_found_before_serving(tmp_path):
    tag = _register("damaged", tmp_path, b"0123456789" * 100)
    model = load_model(tag)
    (model.path / "model.onnx").write_bytes(b"9123456789" * 100)  # same size, other bytes
    with pytest.raises(ModelIntegrityError, match="model.onnx has changed since it was registered"):
        verify(model)
    (model.path / "model.onnx").write_bytes(b"0123")  # cut short: not even listed as complete
    with pytest.raises(ModelNotFoundError, match="is incomplete .*registered as 1000"):
        load_model(tag)


def test_incomplete_versions_are_skipped_with_a_warning_and_pruned(tmp_path, caplog):
    good = _register("leftovers", tmp_path)
    root = models_root() / "leftovers"
    (root / "emptyversion").mkdir()  # what a save killed in its first milliseconds left behind
    no_card = root / "nocard"
    no_card.mkdir()
    (no_card / "model.yaml").write_text((root / good.split(":")[1] / "model.yaml").read_text())
    (no_card / "model.onnx").write_bytes(b"gra")
    assert [m.tag for m in list_models() if m.name == "leftovers"] == [good]
    assert "emptyversion" in caplog.text and "tuneserve models prune" in caplog.text
    assert load_model("leftovers").tag == good
    with pytest.raises(ModelNotFoundError, match="leftovers:emptyversion is incomplete"):
        load_model("leftovers:emptyversion")
    dry = prune(dry_run=True)
    assert {"leftovers:emptyversion", "leftovers:nocard"} <= {what for what, _ in dry} and (root / "nocard").exists()
    removed = {what for what, _ in prune()}
    assert {"leftovers:emptyversion", "leftovers:nocard"} <= removed
    assert not (root / "emptyversion").exists() and not scan_store()[1]
    assert (root / "latest").read_text() == good.split(":")[1]
    import bentoml

    assert good in [str(m.tag) for m in bentoml.models.list()]  # BentoML's own listing works again


_SAVER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from tuneserve.models.artifact import ModelCard
    from tuneserve.models.preprocessing import Preprocessing
    from tuneserve.models.store import save_model
    onnx, extra = Path(sys.argv[1]), Path(sys.argv[2])
    card = ModelCard(arch="resnet18", labels=["a", "b"], preprocessing=Preprocessing())
    small = Path(sys.argv[3])
    small.write_bytes(b"x")
    save_model("warm-up", card, small)  # BentoML's lazy imports happen here: the kill points fall in the save
    print("saving", flush=True)
    start = time.perf_counter()
    save_model("killed", card, onnx, {"history.csv": extra})
    print(time.perf_counter() - start, flush=True)
""")


def test_a_registration_killed_at_any_instant_leaves_all_or_nothing(tmp_path):
    """kill -9 at ten points spread over a save of 40 MB; after each, the store holds only complete versions,
    BentoML can list it, and what the save left behind is in staging, where prune removes it, not in the
    temporary folder."""
    import bentoml

    onnx, extra = tmp_path / "big.onnx", tmp_path / "history.csv"
    onnx.write_bytes(os.urandom(32 * 2**20))
    extra.write_bytes(os.urandom(8 * 2**20))
    # The saver's own temporary folder: what it leaves there is its own, whatever other tests (another pytest-xdist
    # worker's servers) put in the shared /tmp meanwhile.
    saver_tmp = tmp_path / "saver-tmp"
    saver_tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TMPDIR": str(saver_tmp)}

    def run(kill_after_s: float | None) -> float | None:
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(onnx), str(extra), str(tmp_path / "small.onnx")],
                                stdout=subprocess.PIPE, env=env, text=True)
        assert proc.stdout.readline().strip() == "saving"
        if kill_after_s is None:
            return float(proc.stdout.readline())
        time.sleep(kill_after_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None

    duration = run(None)  # one whole save: how long the window to kill in is
    saved = [m.tag for m in list_models() if m.name == "killed"]
    assert len(saved) == 1
    for fraction in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        run(duration * fraction)
        complete, broken = scan_store()
        assert not broken, (fraction, broken)
        for m in (m for m in complete if m.name == "killed"):
            verify(m)  # every visible version is whole
        assert {m.tag for m in complete if m.name == "killed"} >= set(saved)
        assert {str(m.tag) for m in bentoml.models.list() if m.tag.name == "killed"} == {
            m.tag for m in complete if m.name == "killed"}  # BentoML's listing works and agrees
        prune()
        assert not list((bentoml_home() / STAGING_DIR).iterdir())
    assert not list(saver_tmp.iterdir())  # nothing left in the temporary folder
