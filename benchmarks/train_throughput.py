"""Training throughput: synthetic tensors vs the real JPEG-folder pipelines, per architecture.

    python benchmarks/train_throughput.py                                  # defaults for this machine
    python benchmarks/train_throughput.py --archs resnet50 --batch-size 256 --replicate 40 --compile

For each architecture and input variant it measures images/s of full training steps (forward, backward,
AdamW step; bf16 autocast and channels_last on CUDA, fp32 on CPU, as `tuneserve train` does), and the input
pipeline alone (batches produced and delivered to the device, no model):

- synthetic: one random batch already on the device, reused: the model's own ceiling.
- pil:       JPEG files -> PIL decode + RandomResizedCrop + flip + TrivialAugmentWide in DataLoader workers
             (--workers, pinned memory, persistent workers, prefetch 4): torchvision's reference pipeline.
- cache:     files decoded once into the uint8 cache, then batches read from it and augmented on the device
             (`--pipeline cache`); the one-time build is timed separately.

`--replicate N` makes a folder of N symlinked copies of every training image (distinct names), so that an
epoch is long enough for steady state; the hymenoptera folder alone has 244 training photos.
Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from results_io import write_result
from shared_data import HYMENOPTERA
from tuneserve.models.architectures import get_architecture
from tuneserve.models.weights import build_model
from tuneserve.training.cached_loader import CachedLoader
from tuneserve.training.data import discover
from tuneserve.training.gpu_augment import GpuAugment
from tuneserve.training.image_cache import open_cache
from tuneserve.training.loaders import ImageDataset, train_transform

DEFAULT_DATA = HYMENOPTERA


def replicate(data: Path, copies: int, into: Path) -> Path:
    """into/train/<class>/<copy>-<name> symlinks (and val/ once): copies x the training set."""
    for split in ("train", "val"):
        for cls_dir in sorted((data / split).iterdir()):
            if not cls_dir.is_dir():
                continue
            out = into / split / cls_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls_dir.iterdir()):
                for c in range(copies if split == "train" else 1):
                    (out / f"{c:04d}-{f.name}").symlink_to(f.resolve())
    return into


def step_fn(model: nn.Module, device: torch.device, amp: bool, channels_last: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    crit = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = crit(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(batches: Iterable, n_warmup: int, n_steps: int, work, device: torch.device, batch_size: int) -> float:
    """images/s over n_steps batches after n_warmup, with the device synchronised at both ends."""
    it = iter(batches)
    for _ in range(n_warmup):
        work(*next(it))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        work(*next(it))
    sync(device)
    return n_steps * batch_size / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forever(make_iter):
    while True:
        yield from make_iter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--archs", default="resnet50,efficientnet_lite0")
    ap.add_argument("--variants", default="synthetic,pil,cache")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train/<class>/ (and val/)")
    ap.add_argument("--replicate", type=int, default=20 if cuda else 1, help="copies of the training images")
    ap.add_argument("--batch-size", type=int, default=256 if cuda else 16)
    ap.add_argument("--steps", type=int, default=30 if cuda else 4, help="measured steps per variant")
    ap.add_argument("--warmup-steps", type=int, default=10 if cuda else 2)
    ap.add_argument("--pipeline-steps", type=int, default=100 if cuda else 40,
                    help="measured batches for the pipeline alone (more than the prefetched ones)")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="DataLoader workers (pil)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if cuda else "cpu")
    amp = channels_last = cuda
    if cuda:
        torch.backends.cudnn.benchmark = True
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tuneserve-throughput-") as tmp:
        data = replicate(args.data, args.replicate, Path(tmp) / "data") if args.replicate > 1 else args.data
        ds = discover(str(data), None, 0.2, 0, 1)
        labels = [s.label for s in ds.train]
        for arch in args.archs.split(","):
            pp = get_architecture(arch).preprocessing
            model = build_model(arch, len(ds.classes), "none").to(device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            model.train()
            if args.compile:
                model = torch.compile(model)
            step = step_fn(model, device, amp, channels_last)
            need = args.warmup_steps + args.steps
            for variant in args.variants.split(","):
                row: dict[str, Any] = {"arch": arch, "variant": variant, "batch_size": args.batch_size}
                if variant == "synthetic":
                    x = torch.randn(args.batch_size, 3, pp.input_size, pp.input_size, device=device)
                    y = torch.randint(0, len(ds.classes), (args.batch_size,), device=device)
                    make = lambda: ((x, y) for _ in range(need))  # noqa: E731
                elif variant == "pil":
                    loader = torch.utils.data.DataLoader(
                        ImageDataset(ds.train, pp, train_transform(pp, "trivialaugment")), batch_size=args.batch_size,
                        shuffle=True, drop_last=True, num_workers=args.workers, pin_memory=cuda,
                        persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers > 0 else None)
                    make = lambda: iter(loader)  # noqa: E731
                elif variant == "cache":
                    t0 = time.perf_counter()
                    cache = open_cache([s.path for s in ds.train], pp, Path(tmp) / "cache")
                    row["cache_build_s"] = round(time.perf_counter() - t0, 1)
                    row["cache_images"] = len(cache)
                    loader = CachedLoader(cache, labels, args.batch_size, torch.utils.data.RandomSampler(labels),
                                          True, device, GpuAugment(pp, "trivialaugment"))
                    make = lambda: iter(loader)  # noqa: E731
                else:
                    raise SystemExit(f"error: unknown variant {variant!r} (synthetic, pil, cache)")
                deliver = lambda x, y: (x.to(device, non_blocking=True), y.to(device, non_blocking=True))  # noqa: E731
                if variant != "synthetic":
                    row["pipeline_alone_img_s"] = round(timed(forever(make), args.warmup_steps, args.pipeline_steps, deliver,
                                                              device, args.batch_size), 1)
                row["train_img_s"] = round(timed(forever(make), args.warmup_steps, args.steps, step, device,
                                                 args.batch_size), 1)
                rows.append(row)
                print(f"{arch:20s} {variant:10s} train {row['train_img_s']:8.1f} img/s"
                      + (f"   pipeline alone {row['pipeline_alone_img_s']:8.1f} img/s" if "pipeline_alone_img_s" in row else ""),
                      flush=True)
    for row in rows:
        synth = next((r["train_img_s"] for r in rows if r["arch"] == row["arch"] and r["variant"] == "synthetic"), None)
        row["vs_synthetic"] = round(row["train_img_s"] / synth, 2) if synth else None

    print(f"\n{'arch':20s} {'variant':10s} {'batch':>5s} {'train img/s':>12s} {'x synthetic':>12s} {'pipeline alone':>15s}")
    for r in rows:
        print(f"{r['arch']:20s} {r['variant']:10s} {r['batch_size']:>5d} {r['train_img_s']:>12.1f} "
              f"{r['vs_synthetic'] if r['vs_synthetic'] is not None else '-':>12} "
              f"{r.get('pipeline_alone_img_s', '-'):>15}")
    if args.out:
        write_result(args.out, machine=machine(), device=str(device), torch=torch.__version__, amp_bf16=amp,
                     channels_last=channels_last, compile=args.compile, replicate=args.replicate,
                     train_images=len(ds.train), workers=args.workers, rows=rows)


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()}: {os.cpu_count()} CPUs, {gpu}"


if __name__ == "__main__":
    main()
