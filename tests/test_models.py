"""Architectures, pretrained weights and head replacement."""
from __future__ import annotations

import pytest
import torch

from tuneserve.models.architectures import ARCHITECTURES, get_architecture, imagenet_labels
from tuneserve.models.preprocessing import preprocess
from tuneserve.models.weights import WeightsUnavailableError, build_model, head_parameters
from support import photo_path

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def _top1(model, path, arch) -> str:
    x = torch.from_numpy(preprocess(path, get_architecture(arch).preprocessing))[None]
    with torch.no_grad():
        return imagenet_labels()[int(model.eval()(x).argmax())]


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_offline_imagenet_weights_recognise_real_photos(arch):
    model = build_model(arch, 1000, "imagenet")
    assert _top1(model, photo_path("coffee.png"), arch) == "espresso"
    assert _top1(model, photo_path("chelsea.png"), arch) in CAT_CLASSES


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_head_is_replaced_for_odd_class_count(arch):
    model = build_model(arch, 3, "none").eval()
    head = head_parameters(model, arch)
    assert [tuple(p.shape)[0] for p in head] == [3, 3]  # weight (3, F), bias (3,)
    size = get_architecture(arch).preprocessing.input_size
    with torch.no_grad():
        assert model(torch.zeros(2, 3, size, size)).shape == (2, 3)


def test_imagenet_head_swapped_and_backbone_kept():
    pretrained = build_model("efficientnet_lite0", 1000, "imagenet")
    tuned = build_model("efficientnet_lite0", 5, "imagenet")
    assert tuned.classifier.out_features == 5
    torch.testing.assert_close(tuned.conv_stem.weight, pretrained.conv_stem.weight)


def test_local_state_dict_paths(tmp_path):
    torch.manual_seed(0)
    five = build_model("resnet18", 5, "none")
    path = tmp_path / "five.pth"
    torch.save(five.state_dict(), path)
    # same class count: loaded as is, head included
    again = build_model("resnet18", 5, str(path))
    torch.testing.assert_close(again.fc.weight, five.fc.weight)
    # a checkpoint-style dict from a DDP-wrapped model also loads
    torch.save({"model": {f"module.{k}": v for k, v in five.state_dict().items()}}, tmp_path / "ckpt.pt")
    torch.testing.assert_close(build_model("resnet18", 5, str(tmp_path / "ckpt.pt")).fc.weight, five.fc.weight)
    # another class count: backbone kept, fresh head
    seven = build_model("resnet18", 7, str(path))
    assert seven.fc.out_features == 7
    torch.testing.assert_close(seven.conv1.weight, five.conv1.weight)


def test_bad_weights_are_explained(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="is not a file"):
        build_model("resnet18", 2, str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(WeightsUnavailableError, match="cannot read weights"):
        build_model("resnet18", 2, str(junk))
    torch.save(build_model("resnet18", 2, "none").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsUnavailableError, match="no 'classifier.weight' entry"):
        build_model("efficientnet_lite0", 2, str(tmp_path / "r18.pth"))
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        build_model("vgg", 2)


def test_offline_torchvision_download_fails_with_instructions(tmp_path, offline_torch_hub):
    """Without network (simulated, so that the test holds on machines with it): the official download path
    must end in a message that says how to supply weights."""
    with pytest.raises(WeightsUnavailableError) as info:
        build_model("resnet18", 2, "imagenet")
    msg = str(info.value)
    assert "resnet18-f37072fd.pth" in msg and "--weights" in msg and str(tmp_path / "torch") in msg
    assert offline_torch_hub == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]  # tried once


def test_torchvision_weights_come_from_the_cache(tmp_path, offline_torch_hub):
    """A file placed in torchvision's cache is what 'imagenet' loads (the users' offline route), with no download."""
    torch.manual_seed(1)
    fake = build_model("resnet18", 1000, "none").state_dict()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(fake, cache / "resnet18-f37072fd.pth")
    model = build_model("resnet18", 2, "imagenet")
    torch.testing.assert_close(model.conv1.weight, fake["conv1.weight"])
    assert model.fc.out_features == 2 and offline_torch_hub == []
