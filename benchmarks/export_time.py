"""How long the ONNX export takes, per architecture and exporter: torch.export (dynamo, the default) with the
networks' in-place activations as they are, the same with them computing out of place (what
training/export.py does), and the TorchScript exporter.

    python benchmarks/export_time.py                                   # every architecture, 3 rounds
    python benchmarks/export_time.py --archs efficientnet_lite0,resnet18 --rounds 2

Random weights, 3 classes, each network's own input size, with the class activation map output (as every
registration exports it). The three ways are taken in turns within each round, so a busy machine slows them
alike; the table gives each way's median seconds. Writes JSON (--out).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from results_io import write_result
from tuneserve.models.architectures import ARCHITECTURES, get_architecture
from tuneserve.models.weights import build_model
from tuneserve.training import export

WAYS = ("dynamo, in place", "dynamo, out of place", "torchscript")


def export_seconds(model, arch: str, way: str, path: Path) -> float:
    pp = get_architecture(arch).preprocessing
    kept = export.out_of_place
    if way == "dynamo, in place":  # the export as it was before out_of_place: the activations left as they are
        export.out_of_place = contextlib.nullcontext
    try:
        start = time.perf_counter()
        export.export_onnx(model, pp, path, "torchscript" if way == "torchscript" else "dynamo", arch=arch)
        return time.perf_counter() - start
    finally:
        export.out_of_place = kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(ARCHITECTURES), help="comma-separated architecture names")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export-time.json")
    args = ap.parse_args()
    archs = [a for a in args.archs.split(",") if a]
    for arch in archs:
        get_architecture(arch)  # an unknown name fails here, naming the choices
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            model = build_model(arch, 3, "none").eval()
            export_seconds(model, arch, "torchscript", Path(tmp) / "warm.onnx")  # imports and first-call costs
            seconds: dict[str, list[float]] = {way: [] for way in WAYS}
            for _ in range(args.rounds):
                for way in WAYS:
                    seconds[way].append(export_seconds(model, arch, way, Path(tmp) / "m.onnx"))
            row = {"arch": arch, **{way: round(statistics.median(s), 2) for way, s in seconds.items()},
                   "rounds": {way: [round(x, 2) for x in s] for way, s in seconds.items()}}
            rows.append(row)
            print(f"{arch:20s} " + "  ".join(f"{way}: {row[way]:5.1f} s" for way in WAYS), flush=True)
    print()
    print("| architecture | " + " | ".join(WAYS) + " |")
    print("| --- |" + " --- |" * len(WAYS))
    for row in rows:
        print(f"| {row['arch']} | " + " | ".join(f"{row[way]:.1f} s" for way in WAYS) + " |")
    write_result(args.out, rounds=args.rounds, classes=3, cam_output=True, rows=rows)


if __name__ == "__main__":
    main()
