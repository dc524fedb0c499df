"""The built-in model: ImageNet EfficientNet-Lite0, exported and registered on first use, with no network."""
from __future__ import annotations

import logging

from tuneserve.models.architectures import BUILTIN_NAME, DEFAULT_ARCH, get_architecture, imagenet_labels
from tuneserve.models.samples import sample_photos
from tuneserve.models.store import ModelNotFoundError, StoredModel, load_model
from tuneserve.models.weights import build_model

log = logging.getLogger(__name__)

def ensure_builtin_model(name: str = BUILTIN_NAME) -> StoredModel:
    """The latest `name` in the store, exporting and registering it first if it is not there yet."""
    try:
        return load_model(name)
    except ModelNotFoundError:
        pass
    from tuneserve.training.export import export_and_register

    log.info("registering the built-in model %s (ImageNet %s, exported to ONNX)", name, DEFAULT_ARCH)
    photos = sample_photos()
    model = build_model(DEFAULT_ARCH, 1000, "imagenet")
    return export_and_register(
        model, name=name, arch=DEFAULT_ARCH, labels=list(imagenet_labels()), pp=get_architecture(DEFAULT_ARCH).preprocessing,
        parity_paths=[str(p) for p in photos], calibration_paths=[str(p) for p in photos],
        metrics={"source": "ImageNet-1k pretrained weights, not fine-tuned"},
        train_config={"arch": DEFAULT_ARCH, "weights": "imagenet"},
    )
