"""PyTorch -> ONNX with a dynamic batch axis, a parity gate on real images, and registration in the store.

The gate is not optional: torch.onnx's exporters have shipped numerically wrong graphs for torchvision CNNs
(pytorch#169178), and a wrong graph serves wrong labels silently. The exported model must match PyTorch on
real validation images, within MAX_ABS_LOGIT_DIFF and with identical top-1, at batch 1 and at batch N.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from tuneserve.models.artifact import EXPLAIN_ONNX_FILE, FP16_ONNX_FILE, INT8_ONNX_FILE, WEIGHTS_FILE, ModelCard
from tuneserve.models.explain import CAM_OUTPUT
from tuneserve.models.precision import MIN_INT8_TOP1_AGREEMENT, agreement_report, convert_fp16, convert_int8, onnx_logits
from tuneserve.models.preprocessing import Preprocessing, normalise, normaliser, preprocess_pixels
from tuneserve.models.runtime import OnnxClassifier
from tuneserve.models.store import StoredModel, save_model, staging_dir, validate_name
from tuneserve.models.weights import build_model
from tuneserve.training import checkpoint as ckpt_io
from tuneserve.training.cam import CAM_KINDS, CamModel
from tuneserve.training.config import TrainConfig
from tuneserve.training.data import Dataset, discover, fingerprint

log = logging.getLogger(__name__)

MAX_ABS_LOGIT_DIFF = 1e-3  # fp32 vs fp32: real discrepancies are ~1e-5; wrong graphs are off by >> 1e-2
OPSET = 18  # supported by every onnxruntime >= 1.14 and by TensorRT 10


class ExportParityError(RuntimeError):
    def __init__(self, report: dict[str, Any]):
        self.report = report
        super().__init__(
            f"ONNX export failed the parity gate on {report['images']} images: max |logit diff| = "
            f"{report['max_abs_logit_diff']:.3g} (limit {report['tolerance']:.0e}), top-1 agreement "
            f"{report['top1_agreement']:.2%} (need 100%), batch-1 max diff {report['batch1_max_abs_logit_diff']:.3g}"
            + (f", class activation maps max diff {report['cam_max_abs_diff']:.3g}" if "cam_max_abs_diff" in report else "")
        )


INPUT_NAME = "pixels"  # uint8 (N, S, S, 3) RGB, resized and cropped as the card says; normalised in the graph


class PixelInput(nn.Module):
    """`model` behind its own normalisation: uint8 (N, S, S, 3) pixels -> logits (N, C), or, for a CamModel,
    (logits (N, C), cams (N, C, h, w)).

    Serving then hands the engine the uint8 pixels PIL decodes to, without a float32 copy on the host: a
    quarter of the bytes to build, batch and copy to a GPU, and the layout change and multiply-add run on
    the device. The constants are `models.preprocessing.normaliser`'s, so the graph computes exactly what
    `normalise` computes on the host (the parity gate checks the two paths against each other)."""

    def __init__(self, model: nn.Module, pp: Preprocessing):
        super().__init__()
        self.model = model
        scale, offset = normaliser(pp)  # float32 (3, 1, 1) each
        self.register_buffer("scale", torch.from_numpy(scale.copy()))
        self.register_buffer("offset", torch.from_numpy(offset.copy()))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = pixels.permute(0, 3, 1, 2).float()  # (N, 3, S, S) float32, values 0..255
        return self.model(x * self.scale + self.offset)


@contextlib.contextmanager
def out_of_place(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with its in-place activations (ReLU(inplace=True), ReLU6...) computing out of place, restored on
    exit. The same values in eval; torch.export decomposes each in-place op into a copy through the reference
    implementations, which is most of its time on such networks: EfficientNet-Lite0's export takes 5 s instead
    of 8 (benchmarks/export_time.py)."""
    flipped = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    for m in flipped:
        m.inplace = False
    try:
        yield model
    finally:
        for m in flipped:
            m.inplace = True


def export_onnx(model: nn.Module, pp: Preprocessing, path: Path, exporter: str = "dynamo",
                arch: str | None = None) -> Path:
    """Write `model` (float32, CPU, eval) with its normalisation to `path`: input 'pixels' uint8 (N,S,S,3) ->
    'logits' float32 (N,C); with `arch` (one of training/cam.py's CAM_KINDS), also CAM_OUTPUT float32
    (N, C, h, w), the class activation maps, computed from the same features as the logits."""
    model = model.float().cpu().eval()
    outputs = ["logits"]
    if arch is not None:
        model = CamModel(model, arch).eval()
        outputs.append(CAM_OUTPUT)
    model = PixelInput(model, pp).eval()
    example = torch.zeros(2, pp.input_size, pp.input_size, 3, dtype=torch.uint8)
    with warnings.catch_warnings(), out_of_place(model):
        warnings.simplefilter("ignore")  # exporter deprecation chatter; the parity gate is the real check
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(
                model, (example,), str(path), dynamo=True, external_data=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=outputs, dynamic_shapes=({0: batch},), verbose=False,
            )
        elif exporter == "torchscript":
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=outputs,
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            )
        else:
            raise ValueError(f"exporter {exporter!r} is not one of: dynamo, torchscript")
    return path


def parity_report(model: nn.Module, onnx_path: Path, pixels: np.ndarray, pp: Preprocessing,
                  arch: str | None = None) -> dict[str, Any]:
    """pixels: uint8 (N,S,S,3), resized and cropped. Compares PyTorch fp32 on the host-normalised images (as
    training validated them) with onnxruntime (CPU) on the graph's own input; with `arch`, the graph's class
    activation maps too (against training/cam.py's, at batch N)."""
    model = model.float().cpu().eval()
    session = OnnxClassifier(onnx_path, device="cpu")
    x = torch.from_numpy(normalise(pixels, pp))
    with torch.no_grad():
        reference = model(x).numpy()  # (N, C)
    inputs = session.inputs(pixels, pp)
    batched = session(inputs)
    single = session(inputs[:1])
    diff = np.abs(batched - reference)
    cams: dict[str, Any] = {}
    if arch is not None and session.can_explain:
        with torch.no_grad():
            reference_cams = CamModel(model, arch)(x)[1].numpy()  # (N, C, h, w)
        onnx_cams = session.explain(inputs)[1]
        cams = {"cam_shape": list(onnx_cams.shape[1:]),
                "cam_max_abs_diff": float(np.abs(onnx_cams - reference_cams).max())}
    return {
        "images": int(pixels.shape[0]),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "batch1_max_abs_logit_diff": float(np.abs(single - reference[:1]).max()),
        "top1_agreement": float((batched.argmax(1) == reference.argmax(1)).mean()),
        "tolerance": MAX_ABS_LOGIT_DIFF,
        "provider": session.providers[0],
        **cams,
    }


def check_parity(report: dict[str, Any]) -> None:
    ok = (
        report["max_abs_logit_diff"] <= report["tolerance"]
        and report["batch1_max_abs_logit_diff"] <= report["tolerance"]
        and report["top1_agreement"] == 1.0
        and report.get("cam_max_abs_diff", 0.0) <= report["tolerance"]  # the maps are logits too
    )
    if not ok:
        raise ExportParityError(report)


def load_parity_images(paths: list[str], pp: Preprocessing) -> np.ndarray:
    """Real images through the one eval transform, before normalisation -> uint8 (N,S,S,3)."""
    if not paths:
        raise ValueError("the parity gate needs at least one real image")
    return np.stack([preprocess_pixels(p, pp) for p in paths])


def export_and_register(
    model: nn.Module,
    *,
    name: str,
    arch: str,
    labels: list[str],
    pp: Preprocessing,
    parity_paths: list[str],
    metrics: dict[str, Any],
    train_config: dict[str, Any],
    calibration_paths: list[str] | None = None,
    exporter: str = "dynamo",
    extra_files: dict[str, Path] | None = None,
    parent: str | None = None,
    data_fingerprint: str | None = None,
) -> StoredModel:
    """Export, gate, and register as `name:<new version>` (with fp16 and INT8 variants where they agree with
    fp32, and the PyTorch weights for training to continue from). `calibration_paths`: training images that set
    the INT8 variant's activation ranges (none: no INT8 variant). Nothing is registered when any step fails."""
    validate_name(name)
    # Scratch files in the store's staging area: a killed export leaves them where `tuneserve models prune`
    # (and the next save) removes them, not in /tmp.
    with staging_dir(f"export-{name}") as tmp:
        cam_arch = arch if arch in CAM_KINDS else None
        onnx_path = export_onnx(model, pp, Path(tmp) / "model.onnx", exporter, arch=cam_arch)
        images = load_parity_images(parity_paths, pp)
        report = parity_report(model, onnx_path, images, pp, arch=cam_arch)
        log.info(
            "ONNX parity on %d real images: max |logit diff| %.2e, top-1 agreement %.1f%%",
            report["images"], report["max_abs_logit_diff"], 100 * report["top1_agreement"],
        )
        check_parity(report)
        extra = dict(extra_files or {})
        if cam_arch:  # the gated graph explains; classification (and its variants) gets it without the maps
            explain_path = onnx_path.replace(Path(tmp) / EXPLAIN_ONNX_FILE)
            onnx_path = logits_only(explain_path, Path(tmp) / "model.onnx", images, pp)
            extra[EXPLAIN_ONNX_FILE] = explain_path
        extra[WEIGHTS_FILE] = save_weights(model, Path(tmp) / WEIGHTS_FILE)
        reference = onnx_logits(onnx_path, images, pp)  # (N, C): what each variant must agree with
        variants = {"fp16": fp16_variant(onnx_path, Path(tmp) / FP16_ONNX_FILE, images, reference, pp)}
        if calibration_paths:
            calibration = load_parity_images(calibration_paths, pp)
            variants["int8"] = int8_variant(onnx_path, Path(tmp) / INT8_ONNX_FILE, calibration, images, reference, pp)
        for variant in variants.values():
            if variant["kept"]:
                extra[variant["file"]] = Path(tmp) / variant["file"]
        card = ModelCard(arch=arch, labels=list(labels), preprocessing=pp, metrics=metrics,
                         train_config=train_config, parity=report, variants=variants, parent=parent,
                         data_fingerprint=data_fingerprint, input_name=INPUT_NAME,
                         explain_output=CAM_OUTPUT if cam_arch else None)
        return save_model(name, card, onnx_path, extra)


def logits_only(explain_path: Path, out_path: Path, images: np.ndarray, pp: Preprocessing) -> Path:
    """The graph at `explain_path` cut down to what the logits need (onnx's Extractor drops the class activation
    map branch; onnxruntime would run it for every call), written to `out_path`; RuntimeError unless its logits
    on `images` are the full graph's to the bit."""
    import onnx
    from onnx.utils import Extractor

    full = onnx.load(str(explain_path))
    pruned = Extractor(full).extract_model([i.name for i in full.graph.input], ["logits"])
    pruned.ir_version = full.ir_version  # as exported: the onnxruntime that serves it reads this IR version
    del pruned.opset_import[:]
    pruned.opset_import.extend(full.opset_import)
    onnx.save(pruned, str(out_path))
    full_session, alone = OnnxClassifier(explain_path, device="cpu"), OnnxClassifier(out_path, device="cpu")
    x = alone.inputs(images, pp)
    diff = float(np.abs(alone(x) - full_session(x)).max())
    if diff > 0:
        raise RuntimeError(f"the logits-only graph differs from the gated one by {diff:.3g} on the parity images")
    return out_path


def save_weights(model: nn.Module, path: Path) -> Path:
    """The model's state dict as safetensors (tensors only: loading it runs no code)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def load_weights(stored: StoredModel) -> dict[str, torch.Tensor]:
    """The PyTorch weights registered with `stored`; ValueError naming the way out when it has none."""
    from safetensors.torch import load_file

    path = stored.path / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"model {stored.tag} was registered without its PyTorch weights (before tuneserve kept them): "
                         f"export it again from its run folder (tuneserve export RUN_DIR) to continue from it")
    return load_file(str(path))


def fp16_variant(fp32_path: Path, out_path: Path, images: np.ndarray, reference: np.ndarray,
                 pp: Preprocessing) -> dict[str, Any]:
    """Convert to fp16 and measure top-1 agreement with fp32 on the parity images (CPU; the same graph on a
    GPU computes in the same precision). The report goes into the card whether or not the file is kept."""
    report = agreement_report(reference, convert_fp16(fp32_path, out_path), images, pp)
    report["file"] = FP16_ONNX_FILE
    _log_variant("fp16", report)
    return report


def int8_variant(fp32_path: Path, out_path: Path, calibration: np.ndarray, images: np.ndarray,
                 reference: np.ndarray, pp: Preprocessing) -> dict[str, Any]:
    """Quantize to INT8 (calibrated on `calibration`, uint8 pixels of training images) and measure top-1
    agreement with fp32 on the parity images; the report goes into the card whether or not the file is kept."""
    convert_int8(fp32_path, out_path, calibration, pp)
    report = agreement_report(reference, out_path, images, pp, min_agreement=MIN_INT8_TOP1_AGREEMENT)
    report.update(file=INT8_ONNX_FILE, calibration_images=int(len(calibration)))
    _log_variant("int8", report)
    return report


def _log_variant(precision: str, report: dict[str, Any]) -> None:
    log.log(
        logging.INFO if report["kept"] else logging.WARNING,
        "%s variant: top-1 agreement with fp32 %.1f%% on %d real images, max |prob diff| %.2e: %s", precision,
        100 * report["top1_agreement"], report["images"], report["max_abs_prob_diff"],
        "kept" if report["kept"] else f"dropped (needs >= {100 * report['min_top1_agreement']:.1f}%)",
    )


def export_checkpoint(path: Path, name: str, ds: Dataset, cfg: TrainConfig) -> StoredModel:
    """Export a best.pt or last.pt checkpoint (with its run's metrics files and plots) and register it; the
    parity gate runs on the first `cfg.parity_images` validation images of `ds`."""
    best = ckpt_io.load(path)
    run_dir = Path(path).parent
    model = build_model(best["arch"], len(best["classes"]), "none")
    model.load_state_dict(ckpt_io.deployed_weights(best))
    val = best["metrics"] if "metrics" in best else best["history"][-1]["val"]  # last.pt: its own epoch
    metrics = {"val_top1": val["top1"], "val_loss": val["loss"], "val_macro_f1": val["macro_f1"],
               "best_epoch": best["epoch"], "val_images": val["images"]}
    if "top5" in val:
        metrics["val_top5"] = val["top5"]
    metrics["per_class"] = val["per_class"]
    metrics["confusion"] = val["confusion"]
    extras = {f: run_dir / f for f in ("history.json", "history.csv", "curves.png", "confusion_matrix.png", "val_report.json")
              if (run_dir / f).is_file()}
    return export_and_register(
        model, name=name, arch=best["arch"], labels=best["classes"], pp=Preprocessing.from_dict(best["preprocessing"]),
        parity_paths=[s.path for s in ds.val[: cfg.parity_images]], metrics=metrics, train_config=best["config"],
        calibration_paths=calibration_sample([s.path for s in ds.train], cfg.int8_calibration_images),
        exporter=cfg.exporter, extra_files=extras, parent=best["config"].get("init_from"), data_fingerprint=fingerprint(ds),
    )


def calibration_sample(paths: list[str], n: int) -> list[str]:
    """`n` of `paths` spread evenly over the list (training lists are ordered by class: every class is seen)."""
    if n <= 0 or not paths:
        return []
    step = max(1, len(paths) // n)
    return paths[::step][:n]


def export_run(checkpoint: str | Path, name: str | None = None, data: str | None = None,
               exporter: str = "dynamo") -> StoredModel:
    """`tuneserve export`: a run folder (its best.pt) or a checkpoint file, exported under `name` (default: the
    run's), gated on the validation images of `data` (default: the run's data)."""
    path = Path(checkpoint)
    ckpt = ckpt_io.load(path / "best.pt" if path.is_dir() else path)
    saved = TrainConfig.from_dict(ckpt["config"]).to_dict()
    cfg = TrainConfig(**{**saved, **({"data": data} if data else {}), "exporter": exporter})
    ds = discover(cfg.data, cfg.manifest, cfg.val_fraction, cfg.seed, cfg.min_images_per_class)
    return export_checkpoint(Path(ckpt["path"]), name or cfg.model_name(), ds, cfg)
