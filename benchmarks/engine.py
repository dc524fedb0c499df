"""The serving engine alone: onnxruntime images/s per precision, IO binding and CUDA layout, per batch size.

    python benchmarks/engine.py --model imagenet-efficientnet_lite0            # a registered model
    python benchmarks/engine.py --arch resnet50 --batch-sizes 1,32,128,256     # exported here, random weights

Runs the same `models.runtime.OnnxClassifier` the service runs, on already-preprocessed input held on the
host (as the service hands it over: uint8 pixels, or float32 for graphs exported before pixel input), for
each variant:
- precision fp32 / fp16 (the model's fp16 variant, made as export makes it) / int8 (a registered model's INT8
  variant, on CPU),
- IO binding off / on (pre-allocated device input per batch shape),
- on CUDA also NHWC off / on (`prefer_nhwc`).
Prints images/s and ms per batch, and writes JSON (--out). The service's defaults are the fastest row.
`--precisions served --io-binding on --nhwc on` measures only what the service would run on this device: the
precision it picks for the model (fp16 on CUDA where the variant is kept, else fp32) with its CUDA options.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from results_io import write_result
from tuneserve.models.precision import convert_fp16
from tuneserve.models.runtime import OnnxClassifier, choose_providers


def model_files(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Path], int, str]:
    """({precision: graph path}, input size, name)."""
    if args.model:
        from tuneserve.models.artifact import FP16_ONNX_FILE, INT8_ONNX_FILE
        from tuneserve.models.store import load_model

        stored = load_model(args.model)
        fp16 = stored.path / FP16_ONNX_FILE
        if not fp16.exists():
            fp16 = convert_fp16(stored.onnx_path, tmp / "model.fp16.onnx")
        graphs = {"fp32": stored.onnx_path, "fp16": fp16}
        if (stored.path / INT8_ONNX_FILE).exists():
            graphs["int8"] = stored.path / INT8_ONNX_FILE
        return graphs, stored.card.preprocessing.input_size, stored.tag
    from tuneserve.models.architectures import get_architecture
    from tuneserve.models.weights import build_model
    from tuneserve.training.export import export_onnx

    pp = get_architecture(args.arch).preprocessing
    fp32 = export_onnx(build_model(args.arch, args.classes, "none"), pp, tmp / "model.onnx", args.exporter)
    return ({"fp32": fp32, "fp16": convert_fp16(fp32, tmp / "model.fp16.onnx")}, pp.input_size,
            f"{args.arch} (random weights)")


def chosen_precisions(args: argparse.Namespace, graphs: dict[str, Path], on_cuda: bool) -> list[str]:
    """The precisions to measure: every graph, the one the service would serve, or those listed."""
    if args.precisions == "all":
        return list(graphs)
    if args.precisions == "served":
        from tuneserve.models.precision import choose_precision
        from tuneserve.models.store import load_model

        variants = load_model(args.model).card.variants if args.model else {"fp16": {"kept": True}}
        return [choose_precision("auto", "cuda" if on_cuda else "cpu", variants)]
    wanted = args.precisions.split(",")
    unknown = [p for p in wanted if p not in graphs]
    if unknown:
        raise SystemExit(f"error: --precisions {','.join(unknown)}: this model has {', '.join(graphs)} here")
    return wanted


def measure(session: OnnxClassifier, x: np.ndarray, seconds: float) -> float:
    session(x)  # warm-up: arenas, cuDNN algorithm search for this shape
    session(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session(x)
        n += 1
    return n * len(x) / (time.perf_counter() - t0)


def random_input(session: OnnxClassifier, n: int, size: int) -> np.ndarray:
    """n random images as `session`'s graph takes them: uint8 pixels (n, S, S, 3), or float32 (n, 3, S, S) for
    graphs that take normalised input."""
    rng = np.random.default_rng(0)
    if session.takes_pixels:
        return rng.integers(0, 256, session.input_shape(n, size), dtype=np.uint8)
    return rng.standard_normal(session.input_shape(n, size), dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="registered model tag")
    src.add_argument("--arch", help="export this architecture with random weights")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--batch-sizes", default="1,8,32,128")
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default, every "
                    "core; a CPU service worker gets the cores over the workers: 1 with 2 workers on 2 cores)")
    ap.add_argument("--precisions", default="all",
                    help="all, served (what the service picks here for --model), or a list such as fp16,fp32")
    ap.add_argument("--io-binding", default="both", choices=("both", "on", "off"))
    ap.add_argument("--nhwc", default="both", choices=("both", "on", "off"), help="CUDA only")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    switch = {"both": (False, True), "on": (True,), "off": (False,)}

    on_cuda = choose_providers(args.device)[0] != "CPUExecutionProvider"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tuneserve-engine-") as tmp:
        graphs, size, name = model_files(args, Path(tmp))
        if on_cuda:
            graphs.pop("int8", None)  # a CPU variant (models/precision.py)
        graphs = {p: graphs[p] for p in chosen_precisions(args, graphs, on_cuda)}
        variants = [(p, io, nhwc) for p in graphs for io in switch[args.io_binding]
                    for nhwc in (switch[args.nhwc] if on_cuda else (None,))]
        for precision, io_binding, nhwc in variants:
            options = None if nhwc is None else {"prefer_nhwc": "1" if nhwc else "0"}
            session = OnnxClassifier(graphs[precision], args.device, intra_op_threads=args.threads,
                                     io_binding=io_binding, buckets=False, cuda_options=options)
            x_all = random_input(session, max(sizes), size)
            for b in sizes:
                ips = measure(session, x_all[:b], args.seconds)
                row = {"precision": precision, "io_binding": io_binding, "nhwc": nhwc, "batch": b,
                       "images_per_s": round(ips, 1), "ms_per_batch": round(1000 * b / ips, 2),
                       "provider": session.providers[0]}
                rows.append(row)
                print(f"{precision} io_binding={io_binding!s:5} nhwc={nhwc!s:5} batch {b:4d}: {ips:9.1f} img/s", flush=True)

    print(f"\n{name} on {rows[0]['provider']}")
    print(f"{'precision':9s} {'io_bind':7s} {'nhwc':5s} " + " ".join(f"{'b' + str(b):>9s}" for b in sizes) + "   (img/s)")
    for precision, io_binding, nhwc in variants:
        cells = [r["images_per_s"] for r in rows if (r["precision"], r["io_binding"], r["nhwc"]) == (precision, io_binding, nhwc)]
        print(f"{precision:9s} {str(io_binding):7s} {str(nhwc):5s} " + " ".join(f"{c:9.1f}" for c in cells))
    if args.out:
        write_result(args.out, model=name, rows=rows, threads=args.threads, machine=machine(rows[0]["provider"]))


def machine(provider: str) -> str:
    """The host, and the GPU where the session ran on one."""
    import os
    import platform
    import subprocess

    gpu = ""
    if provider == "CUDAExecutionProvider":
        try:
            gpu = ", " + subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                        text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            gpu = ", a CUDA GPU (nvidia-smi unavailable)"
    return f"{platform.node()}: {os.cpu_count()} CPUs{gpu}"


if __name__ == "__main__":
    main()
