"""The default recipe's data-dependent choices: class weighting, crop scale, image size."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneserve.models.architectures import get_architecture
from tuneserve.models.runtime import OnnxClassifier
from tuneserve.training.config import TrainConfig, make_config
from tuneserve.training.gpu_augment import crop_boxes
from tuneserve.training.loaders import train_transform
from tuneserve.training.train import class_weights, train

from support import QUICK_EXPORT


def test_inverse_weighting_gives_every_class_the_same_total_weight():
    counts = [320, 20, 20, 20, 20, 20, 20]  # one class holds 73% of the photos
    w = class_weights(counts, "inverse")
    totals = w * torch.tensor(counts, dtype=torch.float32)
    torch.testing.assert_close(totals, torch.full((7,), totals[0].item()))
    torch.testing.assert_close((w * torch.tensor(counts, dtype=torch.float32)).sum(), torch.tensor(440.0))  # mean 1
    sqrt = class_weights(counts, "sqrt")
    assert 1 < sqrt[1] / sqrt[0] < w[1] / w[0]  # milder: minorities still count more, by less
    torch.testing.assert_close(sqrt[1] / sqrt[0], (w[1] / w[0]).sqrt())


@pytest.mark.parametrize("counts, weighted", [([10, 10, 9], False), ([30, 11, 12], False), ([30, 10], True),
                                              ([320, 20, 20], True)])
def test_auto_weighting_is_sqrt_from_three_to_one(counts, weighted):
    auto = class_weights(counts, "auto")
    assert (auto is not None) == weighted
    if weighted:
        torch.testing.assert_close(auto, class_weights(counts, "sqrt"))
    assert class_weights(counts, "none") is None


def test_yes_no_class_weighting_keeps_its_meaning(tmp_path):
    (tmp_path / "c.yaml").write_text("class_weighting: yes\n")
    assert make_config(str(tmp_path / "c.yaml")).class_weighting == "inverse"
    assert TrainConfig(class_weighting=False).class_weighting == "none"
    with pytest.raises(ValueError, match="class_weighting='often' is not one of: auto, none, inverse, sqrt"):
        TrainConfig(class_weighting="often")


def test_crop_scale_bounds_the_random_crops():
    pp = get_architecture("efficientnet_lite0").preprocessing
    assert train_transform(pp, "flip", 0.35).transforms[0].scale == (0.35, 1.0)
    boxes = crop_boxes(4096, 100, torch.Generator().manual_seed(0), scale=(0.35, 1.0))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 100 ** 2
    assert area.min() >= 0.33 and area.max() <= 1.0  # rounding of w and h moves the area by a pixel a side
    with pytest.raises(ValueError, match="crop_scale must be in \\(0, 1\\], got 0"):
        TrainConfig(crop_scale=0.0)


def test_image_size_reaches_the_exported_model(tiny_folder, tmp_path):
    result = train(TrainConfig(data=str(tiny_folder), epochs=1, head_epochs=1, batch_size=4, loader_workers=0,
                               output_dir=str(tmp_path / "runs"), name="small-input", image_size=96,
                               **QUICK_EXPORT))
    pp = result.model.card.preprocessing
    assert (pp.input_size, pp.resize_size) == (96, 110)  # lite0's 224 of 256, kept: 96 of round(109.7)
    clf = OnnxClassifier(result.model.onnx_path, device="cpu")
    assert clf.session.get_inputs()[0].shape[1:] == [96, 96, 3]
    assert clf(np.zeros((2, 96, 96, 3), np.uint8)).shape == (2, 3)
    with pytest.raises(ValueError, match="image_size must be 0 .* or in \\[32, 1024\\], got 16"):
        TrainConfig(image_size=16)


def test_a_saved_config_without_crop_scale_keeps_the_crops_it_trained_with(tmp_path):
    saved = {k: v for k, v in TrainConfig().to_dict().items() if k != "crop_scale"}
    assert TrainConfig.from_dict(saved).crop_scale == 0.08  # a checkpoint's or card's config: as it ran
    (tmp_path / "c.yaml").write_text("epochs: 3\n")
    assert make_config(str(tmp_path / "c.yaml")).crop_scale == 0.35  # a user's file: today's default
