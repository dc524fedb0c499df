"""What explaining costs: onnxruntime images/s of classify (logits only) and explain (logits + class activation
maps) on the same graph, beside the same network exported without the CAM output.

    python benchmarks/explain_cost.py                          # EfficientNet-Lite0, ImageNet weights, CPU
    python benchmarks/explain_cost.py --classes 10 --batch-sizes 1,32 --device cpu --threads 2

Graphs: "no CAM output" (exported as before this output existed), and "with CAM output" asked for the logits
alone (`OnnxClassifier.__call__`, what classify runs) and for both (`OnnxClassifier.explain`). `--classes`
other than 1000 keeps the ImageNet backbone and puts a random `classes`-way head on it (a fine-tuned model's
head size: the CAM output is classes x h x w per image). Input: the sample photos, preprocessed once and
repeated to each batch size. Each measurement is the median of `--rounds` rounds, taken in turns (so a busy
shared machine slows all three alike), in images per second and images per CPU-second of this process (the
steadier figure where other processes share the cores; with --threads 1 it is the model's whole cost).
Writes JSON (--out).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from results_io import write_result
from tuneserve.models.architectures import get_architecture
from tuneserve.models.preprocessing import preprocess_pixels
from tuneserve.models.runtime import OnnxClassifier
from tuneserve.models.samples import sample_photos


def images_per_s(run, batch: np.ndarray, seconds: float) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU-second of this process). On a shared machine the second
    is the steadier cost measure: other processes slow the wall clock, not the CPU time the model needs."""
    run(batch)  # warm-up
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        run(batch)
        n += len(batch)
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--classes", type=int, default=1000, help="head size (1000: the ImageNet head itself)")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "explain-cost.json")
    args = ap.parse_args()

    from tuneserve.models.weights import build_model, replace_head
    from tuneserve.training.export import export_onnx

    spec = get_architecture(args.arch)
    pp = spec.preprocessing
    model = build_model(args.arch, 1000, "imagenet" if spec.source == "lite" else "none")
    if args.classes != 1000:
        replace_head(model, spec, args.classes)
    pixels = np.stack([preprocess_pixels(p, pp) for p in sample_photos()])  # uint8 (n, S, S, 3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = OnnxClassifier(export_onnx(model, pp, Path(tmp) / "plain.onnx"), device=args.device,
                               intra_op_threads=args.threads)
        cams = OnnxClassifier(export_onnx(model, pp, Path(tmp) / "cams.onnx", arch=args.arch), device=args.device,
                              intra_op_threads=args.threads)
        runs = {"classify, no CAM output": plain, "classify, with CAM output": cams, "explain": cams.explain}
        for b in [int(v) for v in args.batch_sizes.split(",")]:
            batch = np.resize(pixels, (b, *pixels.shape[1:]))
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    samples[name].append(images_per_s(run, batch, args.seconds))
            for name, values in samples.items():
                wall = statistics.median(v[0] for v in values)
                cpu = statistics.median(v[1] for v in values)
                rows.append({"batch": b, "run": name, "images_per_s": wall, "images_per_cpu_s": cpu,
                             "rounds": [[round(w, 1), round(c, 1)] for w, c in values]})
                print(f"batch {b:4d}  {name:28s} {wall:8.1f} img/s  {cpu:8.1f} img per CPU-second")
        provider = cams.providers[0]
    write_result(args.out, arch=args.arch, classes=args.classes, device=args.device, provider=provider,
                 threads=args.threads, cam_shape=[args.classes, *cams.session.get_outputs()[1].shape[2:]], rows=rows)


if __name__ == "__main__":
    main()
