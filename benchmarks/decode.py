"""Decode + preprocess alone: images/s of `models.preprocessing.preprocess` (what the service runs in its
thread pool per image) by photo size, JPEG draft factor and thread count.

    python benchmarks/decode.py                                   # hymenoptera val, 3 sizes, factors 0 and 3
    python benchmarks/decode.py --sizes 500x375,4032x3024 --factors 0,1,2,3 --threads 1,2,16

Each real photo is re-encoded at each size (JPEG quality 90, as a camera or phone would save it), then
decoded from bytes in a thread pool (PIL releases the GIL while decoding and resizing). Factor 0 is a full
decode; factor k draft-decodes while the shorter side stays >= k x resize_size (models/preprocessing.py).
Prints images/s per row and writes JSON (--out).

With --agreement, also runs a model (the built-in ImageNet EfficientNet-Lite0 unless --model names one) on
every photo at every size and factor, and reports how far draft decoding moves its answers from a full
decode: the largest probability change, top-1 flips, and flips where the full decode's top two are more
than 0.02 apart (the rest are coin tosses that any pixel change can flip).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from results_io import write_result
from shared_data import HYMENOPTERA
from tuneserve.models.architectures import get_architecture
from tuneserve.models.preprocessing import Preprocessing, preprocess, preprocess_pixels

DEFAULT_IMAGES = HYMENOPTERA / "val"


def encode_at(paths: list[Path], size: tuple[int, int]) -> list[bytes]:
    """Each photo resized to `size` (swapped for portrait photos) and saved as JPEG quality 90."""
    out = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        w, h = size if img.width >= img.height else size[::-1]
        buf = io.BytesIO()
        img.resize((w, h), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def measure(datas: list[bytes], pp: Preprocessing, threads: int, seconds: float) -> float:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda d: preprocess(d, pp), datas[:threads]))  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += sum(1 for _ in pool.map(lambda d: preprocess(d, pp), datas))
        return n / (time.perf_counter() - t0)


def probabilities(datas: list[bytes], pp: Preprocessing, session) -> np.ndarray:
    """The model's probabilities (N, classes) for every photo, preprocessed with `pp`, 32 at a time."""
    from tuneserve.models.runtime import softmax

    return np.concatenate([softmax(session(session.inputs(np.stack([preprocess_pixels(d, pp) for d in datas[i:i + 32]]), pp)))
                           for i in range(0, len(datas), 32)])


def agreement(datas: list[bytes], base: Preprocessing, factors: list[int], session) -> dict[int, dict[str, Any]]:
    """Per draft factor: how the model's probabilities move from a full decode (factor 0)."""
    probs = {f: probabilities(datas, dataclasses.replace(base, jpeg_draft_factor=f), session)
             for f in dict.fromkeys([0, *factors])}
    exact = probs[0]
    top2 = np.sort(exact, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.02
    out = {}
    for f, p in probs.items():
        flips = p.argmax(1) != exact.argmax(1)
        out[f] = {"max_prob_change": round(float(np.abs(p - exact).max()), 4), "top1_flips": int(flips.sum()),
                  "clear_top1_flips": int(flips[clear].sum()), "photos": len(datas)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of photos (searched recursively)")
    ap.add_argument("--limit", type=int, default=48, help="photos to use")
    ap.add_argument("--arch", default="resnet50", help="whose preprocessing (resize size, interpolation)")
    ap.add_argument("--sizes", default="500x375,1600x1200,4032x3024", help="re-encode each photo at these sizes")
    ap.add_argument("--factors", default="0,3", help="JPEG draft factors (0 = full decode)")
    ap.add_argument("--threads", default="1,2", help="thread-pool sizes")
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--agreement", action="store_true", help="also measure how draft decoding moves a model's answers")
    ap.add_argument("--model", default=None, help="registered model tag for --agreement (default: the built-in model)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    try:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        factors = [int(f) for f in args.factors.split(",")]
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        sys.exit(f"--sizes takes WxH,WxH...; --factors and --threads take integers: got {args.sizes!r}, "
                 f"{args.factors!r}, {args.threads!r}")
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[: args.limit]
    if not paths:
        sys.exit(f"no .jpg files under {args.images}")
    session = None
    if args.agreement:
        from tuneserve.models.runtime import OnnxClassifier
        from tuneserve.models.store import load_model
        from tuneserve.training.builtin import ensure_builtin_model

        stored = load_model(args.model) if args.model else ensure_builtin_model()
        session = OnnxClassifier(stored.onnx_path, "cpu")
        base = stored.card.preprocessing
        args.arch = f"{stored.tag} ({stored.card.arch})"
    else:
        base = get_architecture(args.arch).preprocessing
    rows: list[dict[str, Any]] = []
    for size in sizes:
        datas = encode_at(paths, size)  # type: ignore[arg-type]
        kb = np.mean([len(d) for d in datas]) / 1024
        pps = {f: dataclasses.replace(base, jpeg_draft_factor=f) for f in factors}
        agree = agreement(datas, base, factors, session) if session is not None else {}
        for factor, pp in pps.items():
            for t in threads:
                ips = measure(datas, pp, t, args.seconds)
                rows.append({"size": f"{size[0]}x{size[1]}", "kb": round(kb), "draft_factor": factor,
                             "threads": t, "images_per_s": round(ips, 1), **agree.get(factor, {})})
                print(f"{size[0]}x{size[1]} ({kb:.0f} KB) factor {factor} threads {t:2d}: {ips:8.1f} img/s "
                      f"{agree.get(factor, '')}", flush=True)

    print(f"\n{args.arch} preprocessing (resize {base.resize_size}, {base.interpolation}), {len(paths)} photos")
    extra = "  max_dp flips clear_flips" if session is not None else ""
    print(f"{'size':>10s} {'KB':>6s} {'factor':>6s} " + " ".join(f"{'t' + str(t):>9s}" for t in threads)
          + "   (img/s)" + extra)
    for size in sizes:
        for factor in factors:
            cells = [r for r in rows if r["size"] == f"{size[0]}x{size[1]}" and r["draft_factor"] == factor]
            a = cells[0]
            tail = (f"  {a['max_prob_change']:6.3f} {a['top1_flips']:5d} {a['clear_top1_flips']:11d}"
                    if "top1_flips" in a else "")
            print(f"{a['size']:>10s} {a['kb']:6d} {factor:6d} " + " ".join(f"{c['images_per_s']:9.1f}" for c in cells) + tail)
    if args.out:
        write_result(args.out, arch=args.arch, photos=len(paths), rows=rows)


if __name__ == "__main__":
    main()
