"""Artifacts in the BentoML model store: round trip, listing, failed saves leave nothing behind."""
from __future__ import annotations

import glob
import tempfile

import pytest

from tuneserve.models.artifact import ModelCard
from tuneserve.models.preprocessing import Preprocessing
from tuneserve.models.store import ModelNotFoundError, list_models, load_model, save_model, validate_name


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
    assert loaded.card == _card() and loaded.onnx_path.read_bytes() == b"onnx-bytes"
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
