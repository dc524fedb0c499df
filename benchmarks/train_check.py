"""Fine-tuning images/s from a JPEG folder through `tuneserve train` itself: the command users run, in its own
process, with its defaults for this device (on CUDA: the decoded-image cache with augmentation on the GPU,
bf16 autocast, channels_last, cuDNN autotuning), only the flags after `--` added.

    python3 benchmarks/train_check.py --data PHOTOS --out train.json -- --arch resnet50 --weights none \\
        --epochs 3 --head-epochs 0 --batch-size 256 --no-export

Reports each epoch's training images/s as `tuneserve train` measures it (forward, backward and optimizer steps
over the epoch, input pipeline included; validation and checkpoints not), the last epoch's as the steady
state (the first includes cuDNN's algorithm search), and the wall time of the whole command (data checks,
cache build, every epoch). The run folder goes to a temporary directory unless --runs names one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--runs", type=Path, default=None, help="--output-dir of the run (default: a temporary folder)")
    ap.add_argument("--log", type=Path, default=None, help="the command's output (default: inherited)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: flags for tuneserve train")
    args = ap.parse_args()
    flags = [a for a in args.train_args if a != "--"]
    runs = args.runs or Path(tempfile.mkdtemp(prefix="tuneserve-train-check-"))
    cmd = [sys.executable, "-m", "tuneserve", "train", "--data", str(args.data), "--output-dir", str(runs),
           "--name", "train-check", *flags]
    t0 = time.perf_counter()
    with open(args.log, "w") if args.log else open(os.devnull, "w") as log:
        rc = subprocess.run(cmd, stdout=log if args.log else None, stderr=subprocess.STDOUT if args.log else None).returncode
    wall = time.perf_counter() - t0
    histories = sorted(runs.glob("train-check-*/history.json"))
    epochs = json.loads(histories[-1].read_text()) if histories else []
    rows = [{"epoch": h["epoch"], "phase": h["phase"], "train_images": h["train_images"], "seconds": round(h["seconds"], 2),
             "images_per_s": round(h["images_per_s"], 1), "train_top1": h["train_top1"], "val_top1": h["val_top1"]}
            for h in epochs]
    steady = rows[-1]["images_per_s"] if rows else None
    print(f"\n{'epoch':>5} {'phase':>5} {'images':>7} {'s':>7} {'img/s':>9} {'val top-1':>9}")
    for r in rows:
        print(f"{r['epoch']:>5} {r['phase']:>5} {r['train_images']:>7} {r['seconds']:>7.1f} {r['images_per_s']:>9.1f} "
              f"{r['val_top1']:>9.1%}")
    print(f"tuneserve train exited {rc} after {wall:.0f} s; last epoch {steady} img/s")
    if args.out:
        write_result(args.out, machine=machine(), train_command=" ".join(cmd[1:]), returncode=rc, wall_s=round(wall, 1),
                     images_per_s=steady, epochs=rows)
    sys.exit(rc if rc else (0 if rows else 1))


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()}: {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


if __name__ == "__main__":
    main()
