"""Fine-tune the default model on hymenoptera (train -> val) and report accuracy, wall time and images/s.

    python benchmarks/finetune.py [--data ../shared/datasets/hymenoptera] [--epochs 8] [--set mixup=0.8] [--out benchmarks/results]

Prints a per-epoch table and a summary (best validation top-1, wall time to reach 93% and 96%, total wall time,
training images/s) and writes them as JSON. Wall time counts from the call to train(): data checks, model
building, every epoch, export with its parity gate and registration.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from results_io import write_result
from shared_data import HYMENOPTERA, ROOT

DEFAULT_DATA = HYMENOPTERA


def quiet_training_run(prefix: str) -> None:
    """A fresh BENTOML_HOME for the models a benchmark registers (unless one is set), and INFO logs without
    the exporters' and BentoML's chatter."""
    os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix=f"{prefix}-bentoml-"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnx_ir", "onnxscript", "bentoml", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--epochs", type=int, default=None, help="default: TrainConfig's")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other TrainConfig setting, e.g. --set mixup=0.8 (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    quiet_training_run("tuneserve-bench")

    import torch

    from tuneserve.training.config import make_config
    from tuneserve.training.train import train

    extra = dict(kv.split("=", 1) for kv in args.set)
    cfg = make_config(None, data=args.data, arch=args.arch, epochs=args.epochs, loader_workers=args.workers,
                      output_dir=tempfile.mkdtemp(prefix="tuneserve-bench-runs-"), name="bench-hymenoptera", **extra)
    marks: list[float] = []
    start = time.perf_counter()
    result = train(cfg, on_epoch_end=lambda epoch, row: marks.append(time.perf_counter() - start))
    total = time.perf_counter() - start

    rows = []
    for row, t in zip(result.history, marks):
        rows.append({"epoch": row["epoch"], "phase": row["phase"], "val_top1": row["val_top1"],
                     "train_images_per_s": row["images_per_s"], "elapsed_s": t})

    def time_to(target: float) -> float | None:
        return next((r["elapsed_s"] for r in rows if r["val_top1"] >= target), None)

    train_images = sum(r["train_images"] for r in result.history)
    train_seconds = sum(r["seconds"] for r in result.history)
    summary = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                   f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
        "arch": cfg.arch, "epochs_run": len(rows), "epochs_configured": cfg.epochs, "batch_size": cfg.batch_size,
        "best_epoch": result.best_epoch, "best_val_top1": result.best_metrics["top1"],
        "seconds_to_93": time_to(0.93), "seconds_to_96": time_to(0.96),
        "total_wall_s": total, "train_images_per_s": train_images / train_seconds,
        "registered": result.model.tag if result.model else None,
    }

    print(f"\n{'epoch':>5} {'phase':>5} {'val top-1':>9} {'train img/s':>11} {'elapsed s':>9}")
    for r in rows:
        print(f"{r['epoch']:>5} {r['phase']:>5} {r['val_top1']:>9.2%} {r['train_images_per_s']:>11.1f} {r['elapsed_s']:>9.1f}")
    fmt = lambda v: "not reached" if v is None else f"{v:.0f} s"  # noqa: E731
    print(f"\n{summary['machine']}")
    print(f"best val top-1 {summary['best_val_top1']:.2%} (epoch {summary['best_epoch']}) | "
          f"93% after {fmt(summary['seconds_to_93'])} | 96% after {fmt(summary['seconds_to_96'])} | "
          f"total {total:.0f} s incl. export | {summary['train_images_per_s']:.1f} train img/s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"finetune-{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_result(path, summary=summary, epochs=rows, config=cfg.to_dict())


if __name__ == "__main__":
    main()
