"""A one-time cache of decoded training images: uint8 (N, S, S, 3) in one memory-mapped file.

Why: decoding JPEGs is the slow part of feeding a GPU (PIL: ~210 images/s per core; an H100 trains
ResNet-50 at ~5,600 images/s). Decoding each file once, downsized to S x S (S = the weights' resize size,
256 for 224-pixel models), turns every later epoch into memory reads: ~200 KB per image from the page
cache, augmented on the GPU (training/gpu_augment.py).

What is kept: the image as models.preprocessing.decode gives it to every pipeline (large JPEGs draft-decoded),
its shorter side resized to S with the weights' interpolation, then the centre S x S square,
so the random crops of training come from the same region evaluation's centre crop sees (the far ends of
very wide or tall photos are lost, as in FFCV-style pipelines that store a fixed resolution).

The file's name hashes what it holds (paths, sizes, modification times, S, interpolation, draft), so a changed
dataset gets a new cache and an unchanged one is reused across runs; it is written to a temporary name
and renamed, so an interrupted build leaves nothing that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tuneserve.models.preprocessing import Preprocessing, center_crop, decode, resize_shorter_side

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tuneserve" / "decoded"


def cache_key(paths: list[str], pp: Preprocessing) -> str:
    what = {"size": pp.resize_size, "interpolation": pp.interpolation, "draft": pp.draft_size, "version": 2}
    h = hashlib.sha256(json.dumps(what).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def cache_path(paths: list[str], pp: Preprocessing, cache_dir: str | os.PathLike | None = None) -> Path:
    folder = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    return folder / f"{cache_key(paths, pp)}-{len(paths)}x{pp.resize_size}.u8"


def decode_square(path: str, pp: Preprocessing) -> np.ndarray:
    """One image -> uint8 (S, S, 3), S = pp.resize_size: shorter side to S, centre square."""
    img = resize_shorter_side(decode(path, pp), pp.resize_size, pp.interpolation)
    return np.asarray(center_crop(img, pp.resize_size), dtype=np.uint8)


def build_cache(paths: list[str], pp: Preprocessing, target: Path, threads: int | None = None) -> Path:
    """Decode every image into `target` (uint8 (N, S, S, 3), raw memmap). Threads: PIL releases the
    GIL while decoding and resizing."""
    size = pp.resize_size
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    threads = threads or min(32, os.cpu_count() or 1)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
        with ThreadPoolExecutor(threads) as pool:
            for i, arr in enumerate(pool.map(lambda p: decode_square(p, pp), paths)):
                out[i] = arr
        out.flush()
        del out
        os.replace(tmp, target)  # atomic: a reader sees the whole cache or none
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def open_cache(paths: list[str], pp: Preprocessing, cache_dir: str | os.PathLike | None = None,
               build: bool = True) -> np.ndarray:
    """The cache for `paths` as a read-only memmap uint8 (N, S, S, 3), S = pp.resize_size, built first if
    missing and `build`.
    Under DDP one rank per node builds (build=True) while the others wait at a barrier, then all open it."""
    target = cache_path(paths, pp, cache_dir)
    size = pp.resize_size
    if not target.exists():
        if not build:
            raise FileNotFoundError(f"decoded-image cache {target} is missing")
        log.info("decoding %d training images once into %s (%.1f GB)", len(paths), target,
                 len(paths) * size * size * 3 / 1e9)
        build_cache(paths, pp, target)
    else:
        log.info("using the decoded-image cache %s", target)
    arr = np.load(target, mmap_mode="r")
    if arr.shape != (len(paths), size, size, 3):
        raise ValueError(f"decoded-image cache {target} holds {arr.shape}, expected {(len(paths), size, size, 3)}; "
                         f"delete it to rebuild")
    return arr
