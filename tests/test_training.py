"""Fine-tuning end to end on tiny data: outputs, exact resume, the parity gate, and the CLI's errors (a fine-tune of
real photos, served as validated: test_distributed.py, whose 2-rank test compares against it)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from support import QUICK_EXPORT
import torch

from tuneserve.models.store import load_model
from tuneserve.models.weights import build_model
from tuneserve.training import checkpoint as ckpt_io
from tuneserve.training.config import TrainConfig
from tuneserve.training.export import ExportParityError, check_parity, export_onnx, parity_report
from tuneserve.training.train import train
from tuneserve.cli import main as cli_main

FAST = dict(batch_size=4, loader_workers=0, head_epochs=1)
SMALL_INPUT = 64  # image_size for runs whose checks do not depend on it: 12x less compute than the default 224


@pytest.mark.slow
def test_tiny_run_writes_everything_and_registers(tiny_folder, tmp_path):
    result = train(TrainConfig(data=str(tiny_folder), epochs=2, output_dir=str(tmp_path / "runs"), name="tiny",
                               class_weighting="inverse", **FAST))
    run = result.run_dir
    for f in ["last.pt", "best.pt", "history.json", "history.csv", "val_report.json", "per_class.csv",
              "confusion_matrix.csv", "curves.png", "confusion_matrix.png"]:
        assert (run / f).is_file(), f
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((run / "history.json").read_text())
    assert [h["phase"] for h in history] == ["head", "full"]
    assert set(history[0]["val"]["per_class"]) == {"alpha", "beta", "gamma"}
    assert np.array(history[0]["val"]["confusion"]).sum() == 3  # 20% of 6 images per class
    stored = load_model(result.model.tag)
    card = stored.card
    assert card.labels == ["alpha", "beta", "gamma"] and card.arch == "efficientnet_lite0"
    assert card.parity["top1_agreement"] == 1.0 and card.parity["max_abs_logit_diff"] <= 1e-3
    assert card.metrics["best_epoch"] == result.best_epoch and card.train_config["epochs"] == 2
    assert (stored.path / "curves.png").is_file() and (stored.path / "history.csv").is_file()
    # `tuneserve export RUN` re-exports the best checkpoint as a new version of the same name (through the
    # quicker exporter: the default one was just tested above)
    assert cli_main(["export", str(run), "--name", "tiny", "--exporter", QUICK_EXPORT["exporter"]]) == 0
    again = load_model("tiny")
    assert again.tag != stored.tag and again.card.labels == card.labels
    assert again.card.metrics["val_top1"] == card.metrics["val_top1"]


def test_mixup_and_cutmix_mix_batches_into_soft_targets():
    from tuneserve.training.loop import batch_mixer

    assert batch_mixer(3, 0.0, 0.0) is None
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        mixed, target = batch_mixer(3, mixup, cutmix)(x, y)
        assert mixed.shape == x.shape and target.shape == (8, 3)
        torch.testing.assert_close(target.sum(1), torch.ones(8))
        assert ((target > 0).sum(1) == 2).any() and not torch.equal(mixed, x)  # pairs of images, mixed


def test_a_run_with_mixup_and_cutmix_trains_and_registers(tiny_folder, tmp_path):
    result = train(TrainConfig(data=str(tiny_folder), epochs=2, output_dir=str(tmp_path / "runs"), name="mixed",
                               mixup=0.8, cutmix=1.0, image_size=SMALL_INPUT, **FAST, **QUICK_EXPORT))
    assert result.model is not None and result.model.card.train_config["cutmix"] == 1.0
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    with pytest.raises(ValueError, match="mixup and cutmix must be >= 0"):
        TrainConfig(data=str(tiny_folder), mixup=-1.0)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tiny_folder, tmp_path):
    """Same seed on CPU: stop after epoch 2 of 3 (Ctrl-C), resume, and end with identical weights."""
    # On the CPU: cuDNN's autotuned kernels and bf16 are not bit-reproducible, which is what this compares.
    common = dict(data=str(tiny_folder), epochs=3, head_epochs=1, batch_size=4, loader_workers=1, export=False, seed=7,
                  device="cpu", image_size=SMALL_INPUT)
    full = train(TrainConfig(output_dir=str(tmp_path / "a"), **common))

    def interrupt(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(output_dir=str(tmp_path / "b"), **common), on_epoch_end=interrupt)
    (run_b,) = (tmp_path / "b").iterdir()
    assert ckpt_io.load(run_b)["epoch"] == 2
    resumed = train(TrainConfig(resume=str(run_b), loader_workers=1, export=False))
    assert resumed.run_dir == run_b
    a, b = ckpt_io.load(full.run_dir / "last.pt"), ckpt_io.load(run_b / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


def test_parity_gate_rejects_a_wrong_graph(tmp_path, tiny_folder):
    torch.manual_seed(0)
    model = build_model("resnet18", 3, "none")
    other = build_model("resnet18", 3, "none")  # different random weights: a "wrongly exported" graph
    from tuneserve.models.architectures import get_architecture
    from tuneserve.training.export import load_parity_images

    pp = get_architecture("resnet18").preprocessing
    images = load_parity_images([str(p) for p in sorted(tiny_folder.rglob("*.png"))[:4]], pp)
    # The gate is the subject, not the exporter: TorchScript's (0.7 s a graph against ~3 s).
    good = export_onnx(model, pp, tmp_path / "good.onnx", QUICK_EXPORT["exporter"])
    check_parity(parity_report(model, good, images, pp))  # passes
    bad = export_onnx(other, pp, tmp_path / "bad.onnx", QUICK_EXPORT["exporter"])
    with pytest.raises(ExportParityError, match=r"max \|logit diff\| = .* \(limit 1e-03\)"):
        check_parity(parity_report(model, bad, images, pp))


def test_torchscript_exporter_also_passes_the_gate(tmp_path, tiny_folder):
    from tuneserve.models.architectures import get_architecture
    from tuneserve.training.export import load_parity_images

    model = build_model("mobilenet_v3_large", 3, "none")
    pp = get_architecture("mobilenet_v3_large").preprocessing
    images = load_parity_images([str(p) for p in sorted(tiny_folder.rglob("*.png"))[:3]], pp)
    report = parity_report(model, export_onnx(model, pp, tmp_path / "ts.onnx", "torchscript"), images, pp)
    check_parity(report)
    assert report["images"] == 3
