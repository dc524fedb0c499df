"""Class activation maps in the exported graph: they agree with a PyTorch reference on real photos for every
architecture, average to the logits, leave classification and the precision variants as they were, and old
graphs without them keep classifying."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneserve.models.architectures import ARCHITECTURES, DEFAULT_ARCH, get_architecture
from tuneserve.models.artifact import EXPLAIN_ONNX_FILE, FP16_ONNX_FILE, INT8_ONNX_FILE
from tuneserve.models.explain import CAM_OUTPUT
from tuneserve.models.preprocessing import normalise
from tuneserve.models.runtime import OnnxClassifier
from tuneserve.models.samples import sample_photos
from tuneserve.models.weights import build_model
from tuneserve.training.cam import CamModel
from tuneserve.training.export import export_onnx, load_parity_images

from support import QUICK_EXPORT, builtin_model

CAM_TOLERANCE = 1e-4  # what the issue asks of the served heatmap against PyTorch


def realistic(model: nn.Module, arch: str, x: torch.Tensor) -> nn.Module:
    """Randomly initialised networks collapse real photos to near-constant features (BatchNorm's initial
    statistics do not fit them): every norm layer takes the photos' own statistics, and the head is scaled so
    logits spread like a trained model's (std ~3), so that a 1e-4 agreement means something."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration passes
    model.train()
    with torch.no_grad():
        model(x)
        model(torch.flip(x, dims=[3]))
    model.eval()
    head = model.get_submodule(get_architecture(arch).head)
    with torch.no_grad():
        spread = model(x).std().item()
        head.weight *= 3.0 / spread
        head.bias.normal_(0, 0.5)
    return model


def reference_features(model: nn.Module, arch: str, x: torch.Tensor) -> torch.Tensor:
    """The last feature grid, taken the way each library exposes it (not through training/cam.py)."""
    if get_architecture(arch).source == "lite":
        return model.forward_features(x)
    from torchvision.models.feature_extraction import create_feature_extractor

    node = {"resnet18": "layer4", "resnet50": "layer4", "regnet_y_800mf": "trunk_output"}.get(arch, "features")
    return create_feature_extractor(model, return_nodes={node: "f"})(x)["f"]


def reference_cams(model: nn.Module, arch: str, x: torch.Tensor) -> torch.Tensor:
    """CAM from the checkpoint's features and head weights, written out per head type (training/cam.py's
    docstring gives the equivalences): (N, C, h, w)."""
    f = reference_features(model, arch, x).double()
    head = model.get_submodule(get_architecture(arch).head)
    w, b = head.weight.double(), head.bias.double()
    if arch == "convnext_tiny":
        norm = model.classifier[0]
        pooled = f.mean((2, 3))  # (N, K)
        mu, sigma = pooled.mean(1), torch.sqrt(pooled.var(1, unbiased=False) + norm.eps)  # the image's statistics
        f = (f - mu[:, None, None, None]) / sigma[:, None, None, None] * norm.weight.double()[:, None, None] \
            + norm.bias.double()[:, None, None]
    elif arch == "mobilenet_v3_large":
        hidden = model.classifier[0]
        w1, b1 = hidden.weight.double(), hidden.bias.double()
        z = f.mean((2, 3)) @ w1.T + b1  # (N, H)
        gate = F.hardswish(z) / z  # Hardswish(z) = z * gate
        f = (torch.einsum("hk,nkyx->nhyx", w1, f) + b1[:, None, None]) * gate[:, :, None, None]
    return torch.einsum("ck,nkyx->ncyx", w, f) + b[:, None, None]  # float64


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_cams_agree_with_a_pytorch_reference_on_real_photos(arch, tmp_path):
    """The reference is computed in float64 from the network's own features and head weights: the exact maps.
    EfficientNet-Lite keeps its trained ImageNet head (weights ship offline): within 1e-4, absolutely.
    torchvision's weights need a download, so those networks are random, made realistic; a random deep network
    in float32 (PyTorch's own as much as onnxruntime's) is 1e-5 of the maps' range from the exact values, so
    for them the bound is 1e-4 of that range (docs/training.md lists the measured differences).
    The default architecture is the built-in model's graph, as registered through the default exporter
    (torch.export) and served; the others go through TorchScript's, seconds instead of tens (tests/support.py
    QUICK_EXPORT): the maps are the network's, and each registration's parity gate checks them again through
    whichever exporter it used."""
    torch.manual_seed(0)
    builtin = builtin_model() if arch == DEFAULT_ARCH else None  # exported once a session, with its maps
    # The others at 160 px (a 5 x 5 grid) rather than their own 224-260: the same graph, a third of the compute.
    pp = builtin.card.preprocessing if builtin else dataclasses.replace(get_architecture(arch).preprocessing,
                                                                        input_size=160, resize_size=182)
    pixels = load_parity_images([str(p) for p in sample_photos()], pp)  # 5 real photos, uint8 (5, S, S, 3)
    x = torch.from_numpy(normalise(pixels, pp))
    trained = arch.startswith("efficientnet_lite")
    model = build_model(arch, 1000, "imagenet").eval() if trained else realistic(build_model(arch, 4, "none"), arch, x)
    graph = builtin.explain_path if builtin else export_onnx(model, pp, tmp_path / "m.onnx", QUICK_EXPORT["exporter"],
                                                             arch=arch)
    session = OnnxClassifier(graph, device="cpu")
    got_logits, cams = session.explain(pixels)
    with torch.no_grad():
        own = CamModel(model, arch)(x)[1].numpy()  # PyTorch's own float32 maps, for comparison
        exact = copy.deepcopy(model).double()
        logits = exact(x.double()).numpy()
        expected = reference_cams(exact, arch, x.double()).numpy()
    classes, (h, w) = logits.shape[1], expected.shape[2:]
    assert cams.shape == (5, classes, h, w) and cams.dtype == np.float32 and h == w == pp.input_size // 32
    scale = 1.0 if trained else max(1.0, float(np.abs(expected).max()))
    diff = float(np.abs(cams - expected).max())
    print(f"{arch}: max |CAM diff| onnxruntime {diff:.2e}, PyTorch float32 {np.abs(own - expected).max():.2e}; "
          f"max |CAM| {np.abs(expected).max():.1f}")
    assert diff <= CAM_TOLERANCE * scale, (diff, scale)
    assert np.abs(got_logits - logits).max() <= CAM_TOLERANCE * scale
    # Each class's map averages to its logit (the equivalence that makes the non-linear heads' maps CAMs).
    assert np.abs(expected.mean(axis=(2, 3)) - logits).max() <= 1e-9 * max(1.0, np.abs(logits).max())
    # And the maps are not flat: the agreement is about real spatial structure.
    assert expected.std(axis=(2, 3)).mean() > 0.05


def test_classifying_asks_for_logits_alone_and_old_graphs_keep_classifying(tmp_path):
    torch.manual_seed(0)
    pp = get_architecture("resnet18").preprocessing
    pixels = load_parity_images([str(p) for p in sample_photos()[:3]], pp)
    model = build_model("resnet18", 3, "none").eval()
    old = OnnxClassifier(export_onnx(model, pp, tmp_path / "old.onnx"), device="cpu")  # no CAM output
    new = OnnxClassifier(export_onnx(model, pp, tmp_path / "new.onnx", arch="resnet18"), device="cpu")
    assert not old.can_explain and new.can_explain
    assert [o.name for o in new.session.get_outputs()] == ["logits", CAM_OUTPUT]
    with pytest.raises(ValueError, match="no class activation map output .* re-export it"):
        old.explain(pixels)
    logits, cams = new.explain(pixels)
    assert np.array_equal(new(pixels), logits) and np.abs(old(pixels) - logits).max() < 1e-5
    # Buckets (padded batches) and IO binding: each output set keeps its own binding per shape.
    bound = OnnxClassifier(tmp_path / "new.onnx", device="cpu", buckets=True, io_binding=True, max_batch=4)
    b_logits, b_cams = bound.explain(pixels)
    assert np.abs(b_cams - cams).max() < 1e-5 and np.abs(bound(pixels) - logits).max() < 1e-5
    assert set(bound._bound[(4, *pixels.shape[1:])]) == {("logits",), ("logits", CAM_OUTPUT)}


def test_the_registered_model_explains_from_its_own_graph_and_classifies_without_the_maps(model):
    """The built-in model (export_and_register: parity gate, fp16 and INT8 variants): model.explain.onnx has the
    maps beside the logits; model.onnx and its variants are the same graph without the maps' branch (onnxruntime
    computes every node whatever a call asks for), with the same logits to the bit."""
    card = model.card
    assert card.explain_output == CAM_OUTPUT and model.explain_path == model.path / EXPLAIN_ONNX_FILE
    assert card.parity["cam_max_abs_diff"] <= CAM_TOLERANCE and card.parity["cam_shape"] == [1000, 7, 7]
    assert EXPLAIN_ONNX_FILE in card.files  # checked against its sha256 like the other graphs
    pixels = load_parity_images([str(p) for p in sample_photos()], card.preprocessing)
    explainer = OnnxClassifier(model.explain_path, device="cpu")
    logits, cams = explainer.explain(pixels)
    assert card.labels[int(logits[0].argmax())] in ("espresso", "cup", "coffee mug")  # coffee.png
    classifier = OnnxClassifier(model.onnx_path, device="cpu")
    assert not classifier.can_explain and [o.name for o in classifier.session.get_outputs()] == ["logits"]
    assert np.array_equal(classifier(pixels), logits)
    for variant in (FP16_ONNX_FILE, INT8_ONNX_FILE):
        session = OnnxClassifier(model.path / variant, device="cpu")
        assert not session.can_explain
        assert (session(pixels).argmax(1) == logits.argmax(1)).all()