"""JPEG decoders on one core: Pillow (what tuneserve uses) against libjpeg-turbo through simplejpeg, at full scale
and with libjpeg-turbo's DCT-domain scaling to the smallest size the resize still allows.

    pip install simplejpeg && python benchmarks/jpeg_decoders.py --out benchmarks/results/jpeg-decoders.json

For each way of decoding: ms per photo to decode, ms to decode + resize + crop as the model card says
(ResNet-50's preprocessing: bilinear, shorter side 232, crop 224), and how far the model's input pixels land
from Pillow's (max and mean |difference| in 0-255 levels over every pixel). Photos: hymenoptera val (mostly
500 x 375). Best of 3 passes over the photos, one thread.
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from results_io import write_result
from shared_data import HYMENOPTERA


def best_ms(fn: Callable[[bytes], Any], datas: list[bytes], passes: int = 3) -> float:
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for d in datas:
            fn(d)
        best = min(best, (time.perf_counter() - t0) / len(datas))
    return 1000 * best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=HYMENOPTERA / "val")
    ap.add_argument("--limit", type=int, default=80, help="photos to use")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import simplejpeg

    from tuneserve.models.architectures import get_architecture
    from tuneserve.models.preprocessing import eval_pixels, load_image

    pp = get_architecture("resnet50").preprocessing
    datas = [p.read_bytes() for p in sorted(args.images.rglob("*.jpg"))[: args.limit]]

    def pil_decode(d: bytes) -> Image.Image:
        return load_image(d)  # tuneserve's decode: checks, EXIF orientation, RGB

    def sj_full(d: bytes) -> Image.Image:
        return Image.fromarray(simplejpeg.decode_jpeg(d, "RGB"))

    def sj_scaled(d: bytes) -> Image.Image:  # libjpeg-turbo picks the smallest M/8 scale >= the resize size
        return Image.fromarray(simplejpeg.decode_jpeg(d, "RGB", min_height=pp.resize_size, min_width=pp.resize_size))

    def sj_fast(d: bytes) -> Image.Image:
        return Image.fromarray(simplejpeg.decode_jpeg(d, "RGB", fastdct=True, fastupsample=True))

    reference = [eval_pixels(pil_decode(d), pp).astype(np.int16) for d in datas]
    rows = []
    for name, decode in (("pillow", pil_decode), ("simplejpeg", sj_full), ("simplejpeg fastdct+fastupsample", sj_fast),
                         ("simplejpeg DCT-scaled", sj_scaled)):
        diffs = [np.abs(eval_pixels(decode(d), pp).astype(np.int16) - ref) for d, ref in zip(datas, reference)]
        rows.append({"decoder": name, "decode_ms": round(best_ms(decode, datas), 3),
                     "decode_resize_crop_ms": round(best_ms(lambda d: eval_pixels(decode(d), pp), datas), 3),
                     "max_level_diff": int(max(x.max() for x in diffs)),
                     "mean_level_diff": round(float(np.mean([x.mean() for x in diffs])), 3)})
        print(rows[-1], flush=True)
    sizes = sorted({Image.open(io.BytesIO(d)).size for d in datas}, key=lambda s: -s[0] * s[1])
    print(f"\n{len(datas)} photos, largest {sizes[0]}; ResNet-50 preprocessing, one thread, best of 3")
    print(f"{'decoder':34} {'decode ms':>9} {'+resize ms':>10} {'max diff':>8} {'mean diff':>9}")
    for r in rows:
        print(f"{r['decoder']:34} {r['decode_ms']:>9} {r['decode_resize_crop_ms']:>10} {r['max_level_diff']:>8} "
              f"{r['mean_level_diff']:>9}")
    if args.out:
        write_result(args.out, photos=len(datas), simplejpeg=simplejpeg.__version__, rows=rows)


if __name__ == "__main__":
    main()
