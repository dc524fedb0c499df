"""What an image costs the host's CPUs besides the model: server core-ms per image, model taken out.

    python benchmarks/host_cost.py --out benchmarks/results/host-cost.json

How the model is taken out: the service serves stand-in models whose ONNX graph takes the same input as the
real one (uint8 pixels [N, S, S, 3], as models are exported; `--input float32`: normalised float32
[N, 3, S, S], as models exported before pixel input take it, which the host normalises) and answers 1,000
logits, but computes almost nothing (a mean per channel of an 8 x 8 corner and a 3 x 1000 matrix product:
the engine-alone cost of that graph is measured, printed and subtracted, and is a few microseconds per
image). Everything else a request costs is the real thing: HTTP, body handling, decoding
and preprocessing as the model card says (Lite0's and ResNet-50's preprocessing), admission, the hand-offs
to the decoding pool and the batcher, softmax and top-k over 1,000 classes, JSON. So the server's CPU time
per image with a stand-in is the host cost a GPU host pays with the real model on the GPU. (Subtracting an
engine-alone measurement from a real model's run would be noisier: the model's cost on 2 cores is several
times the host cost, and it competes with decoding for the same cores.)

`--server-dir OLD_CHECKOUT --input float32` measures an older version of the service (a git worktree) the
same way, for before/after comparisons: the stand-ins are registered by this checkout, served by that one.

For each preprocessing and each photo size (a 500x375 hymenoptera photo; the same photo upscaled to
4032x3024, as a phone takes them, saved as JPEG quality 90): single-image POST /models/{name}/classify and
16-image POST /models/{name}/classify_batch, 16 concurrent clients, server process tree CPU (user + system)
before and after.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import os
import tempfile
import time
from pathlib import Path

import loadgen
import numpy as np
from PIL import Image

from request_cpu import fire, tree_cpu_s
from results_io import write_result
from shared_data import HYMENOPTERA

SIZES = {"500x375": None, "4032x3024": (4032, 3024)}


def stand_in_graph(path: Path, input_size: int, pixels: bool, classes: int = 1000) -> Path:
    """uint8 (N, S, S, 3) (`pixels`) or float32 (N, 3, S, S) -> logits (N, classes) at almost no cost: a mean
    per channel of the top-left 8 x 8 pixels (cast to float first), then MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, classes)).astype(np.float32), "w")
    s = input_size
    if pixels:
        graph_input = helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", s, s, 3])
        axes = [1, 2]
    else:
        graph_input = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, s, s])
        axes = [2, 3]
    nodes = [helper.make_node("Slice", [graph_input.name, "starts", "ends", "axes"], ["corner"]),
             helper.make_node("Cast", ["corner"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x", "axes"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "w"], ["logits"])]
    constants = {"starts": [0, 0], "ends": [8, 8], "axes": axes}
    graph = helper.make_graph(
        nodes, "stand_in", [graph_input], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=[weights, *(numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in constants.items())])
    # IR version 10: what onnxruntime 1.2x reads (onnx writes its newest by default).
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    return path


def photo_bytes(size: str) -> bytes:
    photo = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[0]
    if SIZES[size] is None:
        return photo.read_bytes()
    out = io.BytesIO()
    Image.open(photo).convert("RGB").resize(SIZES[size], Image.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600, help="images per measurement")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="server setting (repeatable)")
    ap.add_argument("--preps", default="lite0,resnet50", help="preprocessings to measure: lite0, resnet50")
    ap.add_argument("--photos", default=",".join(SIZES), help=f"photo sizes to measure: {', '.join(SIZES)}")
    ap.add_argument("--server-dir", type=Path, default=None,
                    help="serve this checkout (an older commit in a git worktree) instead of the installed code")
    ap.add_argument("--input", choices=("pixels", "float32"), default="pixels",
                    help="the stand-in graphs' input: uint8 pixels (as models are exported) or normalised float32")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    env = dict(kv.split("=", 1) for kv in args.env)

    with tempfile.TemporaryDirectory(prefix="tuneserve-bench-") as home:
        os.environ["BENTOML_HOME"] = home
        from tuneserve.models.architectures import _preprocessing
        from tuneserve.models.runtime import OnnxClassifier
        from tuneserve.models.store import save_model
        from tuneserve.training.builtin import ensure_builtin_model

        builtin = ensure_builtin_model()
        engine_us = {}
        names = {}
        preps = {"lite0": builtin.card.preprocessing, "resnet50": _preprocessing("resnet50")}
        for arch, prep in ((a, preps[a]) for a in args.preps.split(",")):
            graph = stand_in_graph(Path(home) / f"{arch}.onnx", prep.input_size, args.input == "pixels")
            card = dataclasses.replace(builtin.card, preprocessing=prep, files={}, variants={}, arch=f"stand-in ({arch})")
            names[arch] = save_model(f"stand-in-{arch}", card, graph).name
            session = OnnxClassifier(graph, "cpu", intra_op_threads=1)
            x = np.zeros(session.input_shape(16, prep.input_size), session.input_dtype)
            session(x)
            t0 = time.perf_counter()
            for _ in range(50):
                session(x)
            engine_us[arch] = round(1e6 * (time.perf_counter() - t0) / (50 * 16), 1)

        rows = []
        photos = {size: photo_bytes(size) for size in args.photos.split(",")}
        with loadgen.serve(args.server_dir, {**env, "TUNESERVE_MODELS": ",".join(names.values()),
                                             "TUNESERVE_MAX_LATENCY_MS": "30000"}) as (url, port):
            server = loadgen.server_process(port)
            for arch, name in names.items():
                for size, data in photos.items():
                    for kind in ("single", "batch16"):
                        path = f"/models/{name}/classify" + ("_batch" if kind == "batch16" else "")
                        n = args.images if kind == "single" else args.images // 16
                        body, files = ((data, None) if kind == "single"
                                       else (None, [("images", (f"{i}.jpg", data, "image/jpeg")) for i in range(16)]))
                        asyncio.run(fire(url, path, body, max(1, n // 10), args.concurrency, files=files))  # warm-up
                        cpu0, t0 = tree_cpu_s(server), time.perf_counter()
                        failed = asyncio.run(fire(url, path, body, n, args.concurrency, files=files))
                        cpu1, t1 = tree_cpu_s(server), time.perf_counter()
                        images = n * (16 if kind == "batch16" else 1)
                        measured = 1000 * (cpu1 - cpu0) / images
                        rows.append({"preprocessing": arch, "photo": size, "request": kind, "images": images,
                                     "failed": failed, "images_per_s": round(images / (t1 - t0), 1),
                                     "core_ms_per_image": round(measured, 3),
                                     "host_core_ms_per_image": round(measured - engine_us[arch] / 1000, 3)})
                        print(rows[-1], flush=True)

    print(f"\n{'preprocessing':>13} {'photo':>10} {'request':>8} {'core-ms/img':>11} {'host':>7} {'img/s':>7}")
    for r in rows:
        print(f"{r['preprocessing']:>13} {r['photo']:>10} {r['request']:>8} {r['core_ms_per_image']:>11} "
              f"{r['host_core_ms_per_image']:>7} {r['images_per_s']:>7}")
    print(f"stand-in graph alone, us per image at batch 16, 1 thread: {engine_us}")
    if args.out:
        write_result(args.out, label=args.label, env=env, concurrency=args.concurrency, input=args.input,
                     server_dir=str(args.server_dir) if args.server_dir else None, rows=rows,
                     stand_in_engine_us_per_image=engine_us)


if __name__ == "__main__":
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    main()
