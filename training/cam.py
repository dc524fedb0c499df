"""Class activation maps (CAM) in PyTorch: each class's logit at every location of the last feature grid.

`CamModel(model, arch)` runs a network of models/architectures.py's table as two parts, the feature grid and
its head, and returns the logits the network itself computes (the same operations, in the same order) beside
the CAMs: (logits float32 (N, C), cams float32 (N, C, h, w)). Export puts both in the ONNX graph
(training/export.py), so that serving explains with the batch it classifies and without torch.

Every head here pools the grid by its mean, then maps the pooled vector to logits. CAM is the head applied to
each location instead of to the mean, with every nonlinearity of the head held at its value for the whole
image, so that **the mean of each class's map over the grid is exactly its logit** for every architecture:

- linear heads (efficientnet_lite0/1/2, efficientnet_b0, resnet18/50, regnet_y_800mf): W f[:, y, x] + b,
  the CAM of Zhou et al. (2016).
- convnext_tiny: LayerNorm after pooling. Each location is normalised with the *pooled* vector's mean and
  variance (the image's statistics), then W, b: LayerNorm is affine once its statistics are fixed.
- mobilenet_v3_large: Linear -> Hardswish -> Linear after pooling. Hardswish(z) = z * relu6(z + 3) / 6, a gate
  on z; each location's hidden layer W1 f + b1 is multiplied by the gate computed on the pooled vector, then W2,
  b2. (Applying the nonlinear head at every location as if it were a whole image would not average to the
  logit, and a location whose hidden units all fall below -3 would read 0 whatever it held.)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneserve.models.architectures import get_architecture

CAM_KINDS = {  # arch -> how its head turns into per-location logits (the module docstring says why)
    "efficientnet_lite0": "linear", "efficientnet_lite1": "linear", "efficientnet_lite2": "linear",
    "resnet18": "linear", "resnet50": "linear", "regnet_y_800mf": "linear", "efficientnet_b0": "linear",
    "convnext_tiny": "pooled_layernorm", "mobilenet_v3_large": "gated_hidden",
}


def cam_kind(arch: str) -> str:
    get_architecture(arch)  # an unknown name is reported with the accepted ones
    try:
        return CAM_KINDS[arch]
    except KeyError:
        raise ValueError(f"architecture {arch!r} has no class activation map; those that have: "
                         f"{', '.join(CAM_KINDS)}") from None


def feature_grid(model: nn.Module, arch: str, x: torch.Tensor) -> torch.Tensor:
    """x: float32 (N, 3, S, S), normalised -> the last feature grid (N, K, h, w), before global pooling."""
    spec = get_architecture(arch)
    if spec.source == "lite":  # timm EfficientNet: conv_head, bn2 and its activation included
        return model.forward_features(x)
    if arch.startswith("resnet"):
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        return model.layer4(model.layer3(model.layer2(model.layer1(x))))
    if arch.startswith("regnet"):
        return model.trunk_output(model.stem(x))
    return model.features(x)  # torchvision efficientnet, mobilenet_v3, convnext


def head_logits(model: nn.Module, arch: str, f: torch.Tensor) -> torch.Tensor:
    """f: (N, K, h, w) from feature_grid -> logits (N, C), as the network's own forward computes them."""
    spec = get_architecture(arch)
    if spec.source == "lite":
        return model.forward_head(f)
    if arch == "convnext_tiny":  # avgpool -> classifier (LayerNorm2d, Flatten, Linear)
        return model.classifier(model.avgpool(f))
    pooled = torch.flatten(model.avgpool(f), 1)
    return model.fc(pooled) if hasattr(model, "fc") else model.classifier(pooled)


def class_activation_maps(model: nn.Module, arch: str, f: torch.Tensor) -> torch.Tensor:
    """f: (N, K, h, w) from feature_grid -> cams (N, C, h, w); cams.mean((2, 3)) equals head_logits(f)."""
    kind = cam_kind(arch)
    head = model.get_submodule(get_architecture(arch).head)  # the final nn.Linear: weight (C, K'), bias (C,)
    if kind == "linear":
        return _linear(f, head)
    if kind == "pooled_layernorm":
        norm = model.classifier[0]  # LayerNorm2d over the K channels of the pooled (N, K, 1, 1) vector
        pooled = f.mean(dim=(2, 3), keepdim=True)  # (N, K, 1, 1)
        mean = pooled.mean(dim=1, keepdim=True)
        var = pooled.var(dim=1, keepdim=True, unbiased=False)
        g = f.new_ones(()) if norm.weight is None else norm.weight[None, :, None, None]
        b = f.new_zeros(()) if norm.bias is None else norm.bias[None, :, None, None]
        return _linear((f - mean) / torch.sqrt(var + norm.eps) * g + b, head)
    # gated_hidden: classifier = Linear(K, H), Hardswish, Dropout, Linear(H, C)
    hidden, act = model.classifier[0], model.classifier[1]
    if not isinstance(act, nn.Hardswish):
        raise TypeError(f"{arch}: expected Hardswish after the hidden layer, found {type(act).__name__}")
    z = hidden(f.mean(dim=(2, 3)))  # (N, H): the hidden layer on the pooled vector
    gate = F.relu6(z + 3.0) / 6.0  # Hardswish(z) == z * gate
    per_location = _linear(f, hidden) * gate[:, :, None, None]  # (N, H, h, w)
    return _linear(per_location, head)


def _linear(f: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """nn.Linear on every location: (N, K, h, w) -> (N, out, h, w), as a 1x1 convolution."""
    return F.conv2d(f, layer.weight[:, :, None, None], layer.bias)


class CamModel(nn.Module):
    """`model` (a network of architecture `arch`) as x float32 (N, 3, S, S), normalised -> (logits (N, C),
    cams (N, C, h, w)), both from one pass over the features."""

    def __init__(self, model: nn.Module, arch: str):
        super().__init__()
        cam_kind(arch)
        self.model = model
        self.arch = arch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = feature_grid(self.model, self.arch, x)
        return head_logits(self.model, self.arch, f), class_activation_maps(self.model, self.arch, f)


def pooled_features(model: nn.Module, arch: str, x: torch.Tensor) -> torch.Tensor:
    """x: float32 (N, 3, S, S), normalised -> the globally pooled features (N, K) the head starts from: what a
    linear probe (training/label_issues.py) is fitted on."""
    return feature_grid(model, arch, x).mean(dim=(2, 3))
