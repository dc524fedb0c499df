"""Register a model for speed figures: an architecture with random weights, exported as `tuneserve train`
exports (uint8 pixels in, normalisation in the graph, dynamic batch), with its fp16 variant kept.

    python3 benchmarks/speed_model.py --arch resnet50 --name gpu-check-resnet50 --images PHOTOS/val --out m.json

Why not `tuneserve train` + export: a random-weight network's logits are nearly tied, so fp16 flips a top-1
among the parity images by chance, the variant is dropped, and the service serves fp32: the speed figure would
then measure another precision than a fine-tuned model gets. Here the fp32 parity (ONNX vs PyTorch) and the
fp16 agreement are measured and recorded in the card and the JSON as export records them, but neither can
stop the check, and the fp16 variant is kept whatever its agreement (`"kept_for": "speed figures"` in the
card says so). Serving and the engine figures do not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

from results_io import write_result


def register(arch: str, name: str, images: list[Path], classes: int, exporter: str,
             image_size: int = 0) -> tuple[str, dict]:
    """-> (tag, report): the registered model and what its export measured."""
    from tuneserve.models.architectures import get_architecture
    from tuneserve.models.artifact import FP16_ONNX_FILE, ModelCard
    from tuneserve.models.precision import agreement_report, convert_fp16, onnx_logits
    from tuneserve.models.store import save_model
    from tuneserve.models.weights import build_model
    from tuneserve.training.export import INPUT_NAME, export_onnx, load_parity_images, parity_report

    import torch

    pp = get_architecture(arch).preprocessing
    if image_size and image_size != pp.input_size:  # as `tuneserve train --image-size` scales it
        pp = dataclasses.replace(pp, input_size=image_size, resize_size=round(image_size * pp.resize_size / pp.input_size))
    torch.manual_seed(0)  # the same random weights every run
    model = build_model(arch, classes, "none").eval()
    timings = {}
    with tempfile.TemporaryDirectory(prefix="tuneserve-speed-model-") as tmp:
        t0 = time.perf_counter()
        try:
            onnx_path = export_onnx(model, pp, Path(tmp) / "model.onnx", exporter)
        except Exception as e:  # noqa: BLE001 - e.g. no onnxscript on the GPU image: the older exporter
            if exporter != "dynamo":
                raise
            logging.getLogger(__name__).warning("dynamo export failed (%s); exporting with torchscript", e)
            exporter = "torchscript"
            onnx_path = export_onnx(model, pp, Path(tmp) / "model.onnx", exporter)
        timings["export_s"] = time.perf_counter() - t0
        pixels = load_parity_images([str(p) for p in images], pp)  # uint8 (N, S, S, 3)
        parity = parity_report(model, onnx_path, pixels, pp)
        fp16_path = convert_fp16(onnx_path, Path(tmp) / FP16_ONNX_FILE)
        fp16 = agreement_report(onnx_logits(onnx_path, pixels, pp), fp16_path, pixels, pp)
        fp16.update(file=FP16_ONNX_FILE, agreement_kept=fp16["kept"], kept=True, kept_for="speed figures")
        timings["total_s"] = time.perf_counter() - t0
        card = ModelCard(arch=arch, labels=[f"class{i:02d}" for i in range(classes)], preprocessing=pp,
                         metrics={"source": f"random weights, for speed figures only ({arch})"},
                         train_config={"arch": arch, "weights": "none"}, parity=parity,
                         variants={"fp16": fp16}, input_name=INPUT_NAME)
        stored = save_model(name, card, onnx_path, {FP16_ONNX_FILE: fp16_path})
    return stored.tag, {"parity": parity, "fp16": fp16, "exported_with": exporter,
                        **{k: round(v, 1) for k, v in timings.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--name", required=True, help="model name in the store ($BENTOML_HOME)")
    ap.add_argument("--images", type=Path, required=True, help="folder of JPEGs; the first --parity-images are used")
    ap.add_argument("--parity-images", type=int, default=16)
    ap.add_argument("--classes", type=int, default=1000, help="logits per image (1000: ImageNet's head, as engine.py)")
    ap.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    ap.add_argument("--image-size", type=int, default=0, help="input side (0: the architecture's; rehearsals use less)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnx_ir", "onnxscript", "bentoml"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    images = sorted(p for p in args.images.rglob("*.jpg"))[: args.parity_images]
    if not images:
        raise SystemExit(f"error: no .jpg files under {args.images}")
    tag, report = register(args.arch, args.name, images, args.classes, args.exporter, args.image_size)
    print(f"registered {tag}: fp32 parity max |logit diff| {report['parity']['max_abs_logit_diff']:.2e}, fp16 top-1 "
          f"agreement {report['fp16']['top1_agreement']:.1%} (kept for speed figures), {report['total_s']} s")
    if args.out:
        write_result(args.out, tag=tag, arch=args.arch, classes=args.classes, exporter=args.exporter,
                     **report)


if __name__ == "__main__":
    main()
