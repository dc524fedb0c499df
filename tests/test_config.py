"""Configuration: defaults < file (YAML/TOML/JSON) < CLI flags, and errors that name the bad value."""
from __future__ import annotations

import pytest

from tuneserve.training.config import TrainConfig, make_config


def test_file_then_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("arch: resnet18\nepochs: 5\nbatch-size: 16\nclass_weighting: yes\n")
    cfg = make_config(str(tmp_path / "c.yaml"), epochs=7, data="x")
    assert (cfg.arch, cfg.epochs, cfg.batch_size, cfg.class_weighting, cfg.data) == ("resnet18", 7, 16, "inverse", "x")
    (tmp_path / "c.toml").write_text('[train]\narch = "convnext_tiny"\nlr = 3e-4\n')
    assert make_config(str(tmp_path / "c.toml")).lr == 3e-4


def test_head_epochs_default_follows_epochs_and_the_head():
    assert TrainConfig(epochs=1).head_epochs == 0
    assert TrainConfig(epochs=2).head_epochs == 1
    assert TrainConfig(epochs=10).head_epochs == 2
    assert TrainConfig(max_epochs=2).head_epochs == 1  # adaptive: of its first cycle
    assert TrainConfig(epochs=10, probe_head=True).head_epochs == 0  # fitted on the frozen features instead


@pytest.mark.parametrize("text, message", [
    ("epochs: many\n", "epochs='many' is not a valid int"),
    ("arch: vgg\n", "arch='vgg' is not one of"),
    ("colour: red\n", "unknown key 'colour'"),
    ("- a\n- b\n", "must hold a mapping"),
    ("val_fraction: 1.5\n", "val_fraction must be in \\(0, 1\\)"),
    ("epochs: 2\nhead_epochs: 3\n", "head_epochs must be in \\[0, epochs=2\\]"),
])
def test_bad_files_name_the_problem(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        make_config(str(tmp_path / "c.yaml"))


def test_missing_or_unknown_file_type(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        make_config(str(tmp_path / "nope.yaml"))
    (tmp_path / "c.ini").write_text("x=1")
    with pytest.raises(ValueError, match="must end in .yaml"):
        make_config(str(tmp_path / "c.ini"))
