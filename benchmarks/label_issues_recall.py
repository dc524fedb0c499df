"""How many deliberately swapped labels `tuneserve inspect` finds: recall at the top k of label_issues.csv.

    python benchmarks/label_issues_recall.py                                  # hymenoptera's training photos
    python benchmarks/label_issues_recall.py --data DIR --swap 20 --model TAG

Links every photo of DATA/<class>/ (DATA/train/<class>/ for a train/val layout) into a scratch folder, moves
`--swap` photos chosen with `--seed` to another class's folder (their label is now wrong), runs the inspection
(built-in ImageNet EfficientNet-Lite0 features unless --model, a 5-fold logistic probe, cleanlab) and reports
recall at k = the number swapped (and at 2k), how many photos cleanlab flagged, and how many of those were
swapped. Writes JSON (--out) and keeps the run's pictures in --pictures.
"""
from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

from results_io import write_result
from shared_data import HYMENOPTERA
from tuneserve.training.data import scan_class_folders
from tuneserve.training.diagnostics import inspect_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=HYMENOPTERA)
    ap.add_argument("--swap", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="registered model whose features to use (default: built-in)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pictures", type=Path, default=Path("label-issues-pictures"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "label-issues-recall.json")
    args = ap.parse_args()

    source = args.data / "train" if (args.data / "train").is_dir() else args.data
    pairs = scan_class_folders(source)
    classes = sorted({c for _, c in pairs})
    rng = random.Random(args.seed)
    chosen = rng.sample(range(len(pairs)), args.swap)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        swapped = set()
        for i, (path, cls) in enumerate(pairs):
            target = rng.choice([c for c in classes if c != cls]) if i in chosen else cls
            link = root / target / f"{cls}-{path.name}"  # the true class kept in the name, for the report
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
            if i in chosen:
                swapped.add(str(link))
        start = time.perf_counter()
        found = inspect_folder(str(root), args.model, Path(tmp) / "out", args.device)
        seconds = time.perf_counter() - start
        ranked = [issue.path for issue in found["issues"]]
        args.pictures.mkdir(parents=True, exist_ok=True)
        for f in found["files"]:
            shutil.copy(f, args.pictures / f.name)
    k = args.swap
    recall_k = len(swapped & set(ranked[:k])) / k
    recall_2k = len(swapped & set(ranked[:2 * k])) / k
    flagged_swapped = len(swapped & set(ranked))
    print(f"{found['photos']} photos, {k} labels swapped: recall at top {k} {recall_k:.0%}, at top {2 * k} "
          f"{recall_2k:.0%}; cleanlab flagged {len(ranked)}, {flagged_swapped} of them swapped ({seconds:.0f} s)")
    write_result(args.out, data=str(args.data), photos=found["photos"], classes=classes, swapped=k, seed=args.seed,
                 features=found["model"], recall_at_k=recall_k, recall_at_2k=recall_2k, flagged=len(ranked),
                 flagged_swapped=flagged_swapped, seconds=round(seconds, 1),
                 top=[Path(p).name for p in ranked[:2 * k]])


if __name__ == "__main__":
    main()
