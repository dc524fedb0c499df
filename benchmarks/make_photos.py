"""A labelled JPEG folder made here, for speed checks where no photo set can be carried (the GPU machine has no
../shared and no registry): OUT/train/<class>/*.jpg and OUT/val/<class>/*.jpg.

    python3 benchmarks/make_photos.py OUT --train 8192 --val 512 --classes 8

Each photo is what a camera or a browser sends in the ways that cost a decoder time: camera-like sizes
(500 x 375, 375 x 500 and 640 x 480, as JPEG quality 90 with 4:2:0 chroma, ~40-80 KB), smooth gradients plus
fine texture and noise (nothing compresses to almost nothing). Each class has its own hue and texture
frequency, so a model fine-tuned on them learns something and its top-1 is not a coin toss. Deterministic
per (class, index): the same command makes the same bytes. Speed, not accuracy, is what these photos are for.
"""
from __future__ import annotations

import argparse
import io
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

SIZES = ((500, 375), (375, 500), (640, 480))  # (width, height)


def photo(cls: int, index: int, classes: int, scale: float = 1.0) -> bytes:
    """JPEG bytes of photo `index` of class `cls` (of `classes`); `scale` shrinks it (quick rehearsals)."""
    from PIL import Image

    rng = np.random.default_rng(cls * 1_000_003 + index)
    w, h = SIZES[index % len(SIZES)]
    w, h = max(16, int(w * scale)), max(16, int(h * scale))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    hue = 2 * np.pi * cls / classes
    base = 128 + 90 * np.stack([np.cos(hue), np.cos(hue + 2.1), np.cos(hue + 4.2)])  # (3,) the class colour
    freq = 3.0 + 2.0 * cls / classes + rng.uniform(-0.3, 0.3)
    phase = rng.uniform(0, 2 * np.pi, 2)
    texture = 35 * np.sin(x / freq + phase[0]) * np.cos(y / (freq * 1.7) + phase[1])  # (h, w)
    gradient = 40 * (x / w - 0.5) + 30 * (y / h - 0.5) * rng.uniform(-1, 1)
    rgb = base[None, None, :] + (texture + gradient)[..., None] + rng.normal(0, 6, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write(job: tuple[Path, int, int, int, float]) -> None:
    path, cls, index, classes, scale = job
    path.write_bytes(photo(cls, index, classes, scale))


def make_photos(out: Path, train: int, val: int, classes: int, scale: float = 1.0, workers: int | None = None,
                names: list[str] | None = None) -> Path:
    """Write `train` and `val` photos spread evenly over `classes` class folders under `out` (named `names`, else
    class00, class01...); returns `out`."""
    names = names or [f"class{c:02d}" for c in range(classes)]
    if len(names) != classes:
        raise ValueError(f"{len(names)} class names ({', '.join(names)}) for {classes} classes")
    if classes < 2 or train < classes or val < classes:
        raise ValueError(f"need >= 2 classes and at least one photo per class in each split; got classes={classes}, "
                         f"train={train}, val={val}")
    jobs = []
    for split, n, offset in (("train", train, 0), ("val", val, train)):
        for k in range(n):
            cls = k % classes
            folder = out / split / names[cls]
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((folder / f"{k:06d}.jpg", cls, offset + k, classes, scale))
    with ProcessPoolExecutor(workers or min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(_write, jobs, chunksize=64))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=2048, help="training photos in all")
    ap.add_argument("--val", type=int, default=256, help="validation photos in all")
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every photo by this factor (rehearsals)")
    ap.add_argument("--names", default=None, help="class folder names, comma-separated (default: class00, class01...)")
    args = ap.parse_args()
    names = args.names.split(",") if args.names else None
    if names:
        args.classes = len(names)
    make_photos(args.out, args.train, args.val, args.classes, args.scale, names=names)
    print(f"written: {args.train} training and {args.val} validation photos, {args.classes} classes, under {args.out}")


if __name__ == "__main__":
    main()
