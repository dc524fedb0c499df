"""The GPU check's short table and summary.json, from the files its steps wrote in OUTDIR (benchmarks/gpu_check.sh).

    python3 benchmarks/gpu_check_summary.py OUTDIR

Each end-to-end figure is divided by the engine alone in the precision the service served (the engine step
measures the precision the service picks; a figure served in another precision gets no ratio, and says why),
at the batch size the server averaged per onnxruntime call (the nearest one measured) and at batch 128.
Steps that failed or timed out are listed with their log, and their rows say so instead of a figure.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from results_io import write_result

# docs/benchmarks.md's H100 targets ("Waiting for a GPU").
TARGETS = {"engine_b128": 13_000, "serve_b1c256": 6_000, "serve_b16c256": 8_000, "train": 5_000}
P99_TARGET_MS = 100


def read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(out: Path) -> list[dict[str, Any]]:
    """steps.tsv: one line per step, `name<TAB>exit status<TAB>seconds<TAB>limit<TAB>log`; 124 is a timeout."""
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines() if (out / "steps.tsv").exists() else []:
        name, rc, seconds, limit, log = (line.split("\t") + [""] * 5)[:5]
        status = "ok" if rc == "0" else ("timed out" if rc in ("124", "137") else f"failed (exit {rc})")
        steps.append({"step": name, "status": status, "seconds": float(seconds or 0), "limit_s": float(limit or 0),
                      "log": log})
    return steps


def engine_table(engine: dict[str, Any] | None) -> tuple[str | None, dict[int, float]]:
    """(precision, {batch: img/s}) of the engine step's service-like rows (IO binding on, NHWC where CUDA)."""
    if not engine:
        return None, {}
    rows = [r for r in engine["rows"] if r["io_binding"] and r["nhwc"] in (True, None)]
    if not rows:
        return None, {}
    precision = rows[0]["precision"]
    return precision, {r["batch"]: r["images_per_s"] for r in rows if r["precision"] == precision}


def nearest(by_batch: dict[int, float], batch: float) -> tuple[int, float] | None:
    if not by_batch or not batch:
        return None
    b = min(by_batch, key=lambda k: abs(math.log(k) - math.log(max(batch, 1.0))))
    return b, by_batch[b]


def serve_rows(out: Path, precision: str | None, by_batch: dict[int, float]) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(out.glob("serve-b*c*.json")):
        m = re.fullmatch(r"serve-b(\d+)c(\d+)\.json", path.name)
        r = read(path)
        if not m or r is None:
            continue
        load, runtime = r["load"], r["server"]["runtime"]
        served = runtime.get("precision")
        row = {"images_per_request": int(m[1]), "connections": int(m[2]), "images_per_s": round(load["images_per_s"], 1),
               "p50_ms": load["latency_ms"]["p50"], "p99_ms": load["latency_ms"]["p99"], "errors": load["errors"],
               "provider": runtime.get("provider"), "precision": served, "jpeg_decoder": runtime.get("jpeg_decoder"),
               "mean_batch": r["server_batches"].get("mean_images_per_call"), "gpu_util": load.get("gpu_util_mean"),
               "cpu_util": load.get("machine_cpu_util"), "file": path.name}
        if served != precision:
            row["ratio_note"] = f"served {served}, the engine step measured {precision}: no ratio"
        else:
            at_mean = nearest(by_batch, row["mean_batch"] or 0)
            if not row["mean_batch"]:
                row["ratio_note"] = "the server's batch sizes were not read in the window: no ratio at its mean batch"
            if at_mean:
                row["engine_batch"], row["engine_images_per_s"] = at_mean
                row["ratio_vs_engine_at_mean_batch"] = round(row["images_per_s"] / at_mean[1], 3)
            if 128 in by_batch:
                row["ratio_vs_engine_b128"] = round(row["images_per_s"] / by_batch[128], 3)
        rows.append(row)
    return rows


def fmt(v: Any, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--dry", action="store_true", help="a CPU rehearsal: no figure is a measurement")
    args = ap.parse_args()
    out = args.outdir
    machine = read(out / "machine.json") or {}
    steps = read_steps(out)
    engine = read(out / "engine.json")
    precision, by_batch = engine_table(engine)
    serve = serve_rows(out, precision, by_batch)
    train = read(out / "train.json")
    summary = {
        "dry_run": args.dry, "gpu": machine.get("gpu"), "onnxruntime": machine.get("onnxruntime"),
        "steps": steps,
        "engine": {"precision": precision, "images_per_s_by_batch": by_batch,
                   "provider": engine["rows"][0]["provider"] if engine and engine["rows"] else None},
        "serve": serve,
        "train": None if train is None else {k: train.get(k) for k in ("images_per_s", "wall_s", "returncode",
                                                                         "train_command", "epochs")},
        "targets": TARGETS,
    }
    write_result(out / "summary.json", machine=machine.get("machine", "unknown"), **summary)

    print(f"\n== GPU check{' (DRY RUN on CPU: no figure below is a measurement)' if args.dry else ''}: "
          f"{machine.get('gpu') or 'no GPU'}; onnxruntime runs on "
          f"{(machine.get('onnxruntime') or {}).get('session_runs_on', '?')}")
    print(f"{'step':16s} {'status':16s} {'s':>6s} {'limit':>6s}")
    for s in steps:
        print(f"{s['step']:16s} {s['status']:16s} {s['seconds']:6.0f} {s['limit_s']:6.0f}"
              + ("" if s["status"] == "ok" else f"   see {s['log']}"))
    b128 = by_batch.get(128)
    print(f"\n{'what':38s} {'img/s':>9s} {'p50 ms':>7s} {'p99 ms':>7s} {'x engine':>9s} {'target':>8s}")
    print(f"{'engine ' + str(precision) + ' batch 128, IO binding':38s} {fmt(b128):>9s} {'':>7s} {'':>7s} {'':>9s} "
          f"{TARGETS['engine_b128']:>8,d}")
    for r in serve:
        key = f"serve_b{r['images_per_request']}c{r['connections']}"
        ratio = r.get("ratio_vs_engine_at_mean_batch")
        what = f"serve {r['images_per_request']} img x {r['connections']} conn ({r['precision']}, {r['provider'][:4] if r['provider'] else '?'})"
        print(f"{what:38s} {fmt(r['images_per_s']):>9s} {fmt(r['p50_ms'], '.1f'):>7s} {fmt(r['p99_ms'], '.1f'):>7s} "
              f"{fmt(ratio, '.2f'):>9s} {(format(TARGETS[key], ',d') if key in TARGETS else ''):>8s}"
              + ("" if not r["errors"] else f"  errors {r['errors']}"))
    tr = summary["train"] or {}
    print(f"{'fine-tune (tuneserve train), last epoch':38s} {fmt(tr.get('images_per_s')):>9s} {'':>7s} {'':>7s} "
          f"{'':>9s} {TARGETS['train']:>8,d}")
    print(f"(p99 target {P99_TARGET_MS} ms at 256 connections; x engine: end to end / engine alone, same precision, "
          "at the server's mean batch)")


if __name__ == "__main__":
    main()
