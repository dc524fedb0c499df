"""Does the default fine-tuning recipe hold on data it was never tuned on? Default-recipe accuracy and wall time
on several labelled photo sets, each beside a linear probe on the same frozen features and any published figure.

    python benchmarks/accuracy.py --out benchmarks/results/accuracy.json              # every set
    python benchmarks/accuracy.py --sets leeds-butterfly,rsscn7-imbalanced --set epochs=12
    python benchmarks/accuracy.py --sets hymenoptera --baseline epochs=8,probe_head=false,patience=4   # interleaved A/B

Sets (the photos in ../shared/datasets, or $TUNESERVE_DATASETS; derived sets are written to a temporary folder,
never into the project):
- hymenoptera: ants vs bees, its own train/val split (the set the defaults were first chosen on).
- leeds-butterfly: 10 fine-grained species, 832 photos (shorter side <= 320 px).
- rsscn7: 7 aerial land-use scenes, 2,800 photos at 256 px.
- neu-surface-defect: 6 kinds of hot-rolled steel defect, 1,800 greyscale photos at 200 px (industrial inspection).
- <set>-<N>px: the same photos downscaled to an N px shorter side (low-resolution data, as thumbnails or crops
  from a larger frame are), e.g. -64px, -128px.
- <set>-imbalanced: one class (the first) cut to a tenth of its training photos; validation keeps them all, so
  that class's recall is measured on as many photos as the others.
- <set>-dominant: the other way round: every class but the first cut alike, in training and validation, so that
  the first holds 70% of the photos (as defect/no-defect inspection data often does: a model that answers the
  dominant class for everything scores its share).
- <set>-<K>classes: the first K classes only (alphabetical). With -dominant, fewer classes leave each minority
  class more photos: rsscn7-3classes-dominant keeps 17 validation photos of each of its two minority classes
  (grass, the scene most like the dominant field, and forest), enough for their recall to mean something.
- <set>-grey: the photos in greyscale (saved as RGB), as industrial and medical cameras give them.
Variants combine: rsscn7-64px-dominant, rsscn7-3classes-dominant. `--limit TRAIN,VAL` keeps at most that many
photos per class of each split, for every set; `SET@TRAIN/VAL` (rsscn7-64px@80/40) for that set only
(quick sweeps; the figures recorded in docs/benchmarks.md say when they are from such a subset).
Folder-per-class sets are split as `tuneserve train` splits them (20% per class, seed 0), and the derived ones
are written with that split as train/ and val/ folders, so the probe and the recipe see the same photos.

The linear probe: the pretrained network with its head removed, features of every photo through the one eval
transform (no augmentation), a multinomial logistic regression (full-batch L-BFGS; the L2 strength chosen on a
fifth of the training photos held out, then refit on all of them). A fine-tuning recipe that does not beat it
has not used the data. Published figures (SOURCES.md of the datasets) are quoted where one exists, with its
caveats.
"""
from __future__ import annotations

import argparse
import collections
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from finetune import quiet_training_run
from results_io import write_result
from shared_data import DATASETS

BASE_SETS = {"hymenoptera": "hymenoptera", "leeds-butterfly": "leeds-butterfly", "rsscn7": "rsscn7",
             "neu-surface-defect": "neu-surface-defect"}
# One set of each kind: everyday photos, fine-grained species, low-resolution everyday photos, aerial scenes at
# low resolution, industrial inspection (greyscale) balanced and with a dominant class.
DEFAULT_SETS = ("hymenoptera", "leeds-butterfly", "hymenoptera-64px", "rsscn7-64px", "neu-surface-defect",
                "neu-surface-defect-dominant")
PUBLISHED = {
    "leeds-butterfly": "89.5% (VGG16 ImageNet features frozen, new head, 50 val photos; a weak lower bound)",
    "rsscn7": "none verified for an ImageNet fine-tune; 83.75% for a small network trained from scratch (LRRN)",
    "neu-surface-defect": "100% (ResNet-18 fine-tuned, 224 px, 70/30 split, best epoch picked on the validation "
                          "photos: optimistic); 96.3% (ResNet-18 frozen, new head, held-out test set)",
}
PUBLISHED_TOP1 = {"neu-surface-defect": 1.0, "leeds-butterfly": 0.895}  # the figure the targets compare with
# Minority classes with at least this many validation photos are held to a recall >= 0.5; with fewer, one
# photo moves the recall by more than 1/15 and the figure says little.
MIN_SUPPORT = 15
IMBALANCE = 10  # the -imbalanced sets keep 1 in this many training photos of their first class
# The -dominant sets' first class holds this share of each split: inspection sets often hold ~70-75% defect-free
# photos, and 70% leaves a 3-class 256 px aerial set (rsscn7-3classes-dominant) >= 15 validation photos a minority
# class.
DOMINANT_SHARE = 0.70


def split_of(folder: Path, seed: int = 0, val_fraction: float = 0.2):
    """tuneserve's own discovery and split of `folder` (training/data.py)."""
    from tuneserve.training.data import discover

    return discover(str(folder), None, val_fraction, seed, 2)


VARIANTS = ("-<N>px", "-<K>classes", "-imbalanced", "-dominant", "-grey")
_VARIANT = re.compile(r"(-\d+px|-\d+classes|-imbalanced|-dominant|-grey)$")


def parse_set(name: str) -> tuple[str, list[str]]:
    """'rsscn7-64px-dominant' -> ('rsscn7', ['-64px', '-dominant']); SystemExit naming the accepted sets."""
    base, variants = name, []
    while base not in BASE_SETS and (m := _VARIANT.search(base)):
        variants.insert(0, m.group(1))
        base = base[: m.start()]
    if base not in BASE_SETS:
        raise SystemExit(f"error: unknown set {name!r}; sets: {', '.join(BASE_SETS)}, each with any of the suffixes "
                         f"{', '.join(VARIANTS)}")
    return base, variants


def dominant_quota(samples) -> dict[int, int]:
    """How many photos of each class a -dominant split keeps: the first class all of its own, every other class
    the same fraction of its own, so that the first holds DOMINANT_SHARE of the split."""
    counts = collections.Counter(s.label for s in samples)
    others = sum(n for label, n in counts.items() if label != 0)
    keep = counts.get(0, 0) * (1 - DOMINANT_SHARE) / DOMINANT_SHARE / max(1, others)
    return {label: n if label == 0 else max(1, round(n * keep)) for label, n in counts.items()}


def derive(name: str, work: Path, limit: tuple[int, int] | None = None) -> Path:
    """The folder of set `name`: a base set as it is, or a derived copy with train/ and val/ written under `work`."""
    base, variants = parse_set(name)
    if not variants and limit is None:
        return DATASETS / BASE_SETS[base]
    from PIL import Image

    ds = split_of(DATASETS / BASE_SETS[base])
    out = work / name
    rng = random.Random(0)
    first = next((int(v[1:-7]) for v in variants if v.endswith("classes")), len(ds.classes))
    if not 2 <= first <= len(ds.classes):
        raise SystemExit(f"error: {name!r} keeps {first} classes; {base} has {len(ds.classes)}, and a set needs 2")
    for split, samples, cap in (("train", ds.train, limit and limit[0]), ("val", ds.val, limit and limit[1])):
        samples = [s for s in samples if s.label < first]
        quota = dominant_quota(samples) if "-dominant" in variants else {}
        kept: dict[int, int] = {}
        for s in samples:
            if "-imbalanced" in variants and split == "train" and s.label == 0 and rng.randrange(IMBALANCE):
                continue
            if kept.get(s.label, 0) >= quota.get(s.label, len(samples)):
                continue
            if cap and kept.get(s.label, 0) >= cap:
                continue
            kept[s.label] = kept.get(s.label, 0) + 1
            dest = out / split / ds.classes[s.label] / (Path(s.path).stem + ".jpg")
            dest.parent.mkdir(parents=True, exist_ok=True)
            img = Image.open(s.path).convert("RGB")
            side = next((int(v[1:-2]) for v in variants if v.endswith("px")), None)
            if side:
                w, h = img.size
                scale = side / min(w, h)
                img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
            if "-grey" in variants:
                img = img.convert("L").convert("RGB")
            img.save(dest, "JPEG", quality=90)
    return out


def linear_probe(folder: Path, arch: str) -> dict[str, Any]:
    """Top-1, macro-F1 and lowest class recall of a logistic regression on the frozen pretrained features of
    `folder`'s photos."""
    import numpy as np
    import torch
    import torch.nn as nn

    from tuneserve.models.architectures import get_architecture
    from tuneserve.models.preprocessing import preprocess
    from tuneserve.models.weights import build_model
    from tuneserve.training.head_probe import fit_linear
    from tuneserve.training.metrics import summarize

    started = time.perf_counter()
    ds = split_of(folder)
    spec = get_architecture(arch)
    net = build_model(arch, 1000, "imagenet").eval()
    net.set_submodule(spec.head, nn.Identity())  # the pooled features the new head sees

    def features(samples) -> tuple[torch.Tensor, torch.Tensor]:
        xs = []
        with torch.no_grad():
            for i in range(0, len(samples), 32):
                batch = np.stack([preprocess(s.path, spec.preprocessing) for s in samples[i:i + 32]])
                xs.append(net(torch.from_numpy(batch)).flatten(1))
        return torch.cat(xs).double(), torch.tensor([s.label for s in samples])

    xtr, ytr = features(ds.train)
    xva, yva = features(ds.val)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mean) / std, (xva - mean) / std
    classes = len(ds.classes)

    def fit(x, y, l2: float):
        w, b = fit_linear(x, y, classes, l2, None, 0.0)  # the run's own probe fit (training/head_probe.py)
        return lambda feats: feats @ w.T + b

    def top1(head, x, y) -> float:
        return float((head(x).argmax(1) == y).double().mean())

    order = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))
    hold, keep = order[: len(order) // 5], order[len(order) // 5:]
    grid = (1e-4, 1e-3, 1e-2, 1e-1)
    chosen = max(grid, key=lambda l2: top1(fit(xtr[keep], ytr[keep], l2), xtr[hold], ytr[hold]))
    predicted = fit(xtr, ytr, chosen)(xva).argmax(1).numpy()
    confusion = np.bincount(yva.numpy() * classes + predicted, minlength=classes * classes).reshape(classes, classes)
    val = summarize(confusion, 0.0, None, ds.classes)
    return {"top1": val["top1"], "macro_f1": val["macro_f1"],
            "min_class_recall": min(c["recall"] for c in val["per_class"].values()), "l2": chosen,
            "train_images": len(ytr), "val_images": len(yva), "classes": classes,
            "seconds": round(time.perf_counter() - started, 1)}


def flip_tta(run_dir: Path, folder: Path) -> dict[str, float]:
    """Validation top-1 and macro-F1 of the run's best checkpoint with the softmax averaged over the photo and its
    mirror image (test-time augmentation), beside the plain figure from the same pass: does TTA pay?"""
    import numpy as np
    import torch

    from tuneserve.models.preprocessing import Preprocessing, preprocess
    from tuneserve.models.weights import build_model
    from tuneserve.training.checkpoint import deployed_weights
    from tuneserve.training.metrics import summarize

    ck = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)
    net = build_model(ck["arch"], len(ck["classes"]), "none")
    net.load_state_dict(deployed_weights(ck))
    net.eval()
    pp = Preprocessing.from_dict(ck["preprocessing"])
    val = split_of(folder).val
    plain, mirrored = [], []
    with torch.no_grad():
        for i in range(0, len(val), 32):
            x = torch.from_numpy(np.stack([preprocess(s.path, pp) for s in val[i:i + 32]]))  # (B, 3, S, S)
            plain.append(net(x).softmax(1))
            mirrored.append(net(x.flip(3)).softmax(1))
    y = np.array([s.label for s in val])
    c = len(ck["classes"])
    out = {}
    for key, probs in (("plain", torch.cat(plain)), ("flip", (torch.cat(plain) + torch.cat(mirrored)) / 2)):
        cm = np.bincount(y * c + probs.argmax(1).numpy(), minlength=c * c).reshape(c, c)
        m = summarize(cm, 0.0, None, ck["classes"])
        out[f"{key}_top1"], out[f"{key}_macro_f1"] = round(m["top1"], 4), round(m["macro_f1"], 4)
    return out


def first_cycle(history: list[dict[str, Any]], seconds: float) -> dict[str, Any] | None:
    """What the run had at the end of the adaptive schedule's first cycle, which trains exactly as the fixed 8-epoch
    recipe (same steps, same seeds): its best epoch's figures, and the wall time a run stopping there would have
    taken (the time to that epoch plus what followed the last: export and diagnostics)."""
    from tuneserve.training.progress import best_of
    from tuneserve.training.schedule import FIRST_CYCLE_EPOCHS

    if not history or "cycles" not in history[-1]:
        return None  # a fixed-length run
    rows = history[:FIRST_CYCLE_EPOCHS]
    best = best_of(rows)
    return {"top1": best["val_top1"], "macro_f1": best["val_macro_f1"], "best_epoch": best["epoch"], "epochs": len(rows),
            "min_class_recall": min(c["recall"] for c in best["val"]["per_class"].values()),
            "seconds": round(rows[-1]["elapsed_s"] + seconds - history[-1]["elapsed_s"], 1)}


def fine_tune(folder: Path, arch: str, overrides: dict[str, str], runs: Path, name: str) -> dict[str, Any]:
    """The default recipe (`tuneserve train` with only --data, plus `overrides`): best validation metrics, wall time."""
    from tuneserve.training.config import make_config
    from tuneserve.training.train import train

    cfg = make_config(None, data=str(folder), arch=arch, output_dir=str(runs), name=name, **overrides)
    started = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - started
    best = result.best_metrics
    int8 = result.model.card.variants.get("int8", {}) if result.model else {}
    supported = [c["recall"] for c in best["per_class"].values() if c["support"] >= MIN_SUPPORT]
    return {"top1": best["top1"], "macro_f1": best["macro_f1"], "top5": best.get("top5"), "best_epoch": result.best_epoch,
            "epochs": len(result.history), "last_train_top1": result.history[-1]["train_top1"],
            "min_class_recall": min(c["recall"] for c in best["per_class"].values()), "seconds": round(seconds, 1),
            # the lowest recall of the classes with enough validation photos to measure one (the target)
            "min_supported_recall": min(supported) if supported else None,
            "per_class_recall": {k: [round(c["recall"], 3), c["support"]] for k, c in best["per_class"].items()},
            "val_loss_per_epoch": [round(r["val_loss"], 4) for r in result.history],
            "val_top1_per_epoch": [round(r["val_top1"], 4) for r in result.history],
            "schedule": [f"{r['epoch']}: {r['schedule']}" for r in result.history if r.get("schedule")],
            "tta": flip_tta(result.run_dir, folder),
            "first_cycle": first_cycle(result.history, seconds),
            # the INT8 variant made at export: its top-1 agreement with fp32 on the parity images, and whether kept
            "int8_agreement": int8.get("top1_agreement"), "int8_kept": int8.get("kept")}


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and worst over the sets, per recipe: top-1, macro-F1, lowest class recall, and the gain over the probe."""
    out = {}
    for which in ("probe", "baseline", "recipe"):
        runs = [(r[which], r.get("probe")) for r in rows if which in r]
        if not runs:
            continue
        stats: dict[str, Any] = {}
        for key in ("top1", "macro_f1", "min_class_recall"):
            values = [run[key] for run, _ in runs]
            stats[f"mean_{key}"] = round(sum(values) / len(values), 4)
            stats[f"worst_{key}"] = round(min(values), 4)
        gains = [run["top1"] - probe["top1"] for run, probe in runs if probe and which != "probe"]
        if gains:
            stats["mean_top1_over_probe"], stats["worst_top1_over_probe"] = (round(sum(gains) / len(gains), 4),
                                                                             round(min(gains), 4))
        if which != "probe":
            stats["minutes"] = round(sum(run["seconds"] for run, _ in runs) / 60, 1)
        out[which] = stats
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(DEFAULT_SETS), help="comma-separated; see the module docstring")
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a TrainConfig setting for the recipe, e.g. --set epochs=12 (repeatable)")
    ap.add_argument("--no-probe", action="store_true", help="skip the linear probes")
    ap.add_argument("--probe-only", action="store_true", help="only the linear probes (no fine-tuning)")
    ap.add_argument("--limit", default=None, metavar="TRAIN,VAL",
                    help="at most this many photos per class in each split (quick sweeps)")
    ap.add_argument("--baseline", default="", metavar="KEY=VALUE,...",
                    help="also run the recipe with these settings on each set, just before the default (A/B); the "
                         "recipe before the adaptive schedule: epochs=8,probe_head=false,patience=4")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    quiet_training_run("tuneserve-accuracy")
    overrides = dict(kv.split("=", 1) for kv in args.set)
    limit = tuple(int(n) for n in args.limit.split(",")) if args.limit else None

    baseline = dict(kv.split("=", 1) for kv in args.baseline.split(",")) if args.baseline else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="tuneserve-accuracy-") as tmp:
        work = Path(tmp)
        for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
            name, _, own = name.partition("@")
            folder = derive(name, work, tuple(int(n) for n in own.split("/")) if own else limit)
            name += f"@{own}" if own else ""
            row: dict[str, Any] = {"set": name, "published": PUBLISHED.get(name)}  # derived sets have none
            if not args.no_probe:
                row["probe"] = linear_probe(folder, args.arch)
            if not args.probe_only:
                run_name = name.replace("_", "-").replace("@", "-").replace("/", "-")
                if baseline is not None:  # interleaved, set by set: the two wall times saw the same machine
                    row["baseline"] = fine_tune(folder, args.arch, {**overrides, **baseline}, work / "runs", run_name)
                row["recipe"] = fine_tune(folder, args.arch, overrides, work / "runs", run_name)
            rows.append(row)
            print(row, flush=True)

    # top-1 / macro-F1 / lowest class recall: on an imbalanced set top-1 mostly counts the big class.
    def fmt(r: dict[str, Any] | None) -> str:
        return f"{r['top1']:.1%} {r['macro_f1']:.3f} {r['min_class_recall']:.3f}" if r else "-"

    print(f"\n{'set':28} {'probe top-1/F1/min-recall':>26} {'baseline':>21} {'epochs':>6} {'min':>5} "
          f"{'recipe top-1/F1/min-recall':>27} {'epochs':>6} {'min':>5} {'vs probe':>9}")
    for r in rows:
        b, f, p = r.get("baseline"), r.get("recipe"), r.get("probe")
        gap = f"{(f['top1'] - p['top1']) * 100:+.1f}" if f and p else "-"
        print(f"{r['set']:28} {fmt(p):>26} {fmt(b):>21} {b['epochs'] if b else '-':>6} "
              f"{b['seconds'] / 60 if b else 0:>5.1f} {fmt(f):>27} {f['epochs'] if f else '-':>6} "
              f"{f['seconds'] / 60 if f else 0:>5.1f} {gap:>9}")
    summary = summarize_rows(rows)
    for key, values in summary.items():
        print(f"{key:28} " + "  ".join(f"{k} {v}" for k, v in values.items()))
    if args.out:
        write_result(args.out, label=args.label, arch=args.arch, overrides=overrides, baseline=baseline,
                     limit=args.limit, rows=rows, summary=summary)


if __name__ == "__main__":
    main()
