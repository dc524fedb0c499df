"""benchmarks/gpu_check.sh rehearsed on the CPU (GPU_CHECK_DRY=1): every step runs for real on tiny inputs (photos
generated, a random-weight model registered, the engine, a service under a 1-image load at 256 connections and a
16-image one at 64 (the GPU run adds the other two pairs), `tuneserve train`), and writes the files the GPU run
writes, each with its command, machine and date; and the budget stops steps without stopping the script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["machine", "photos", "model", "engine", "train", "serve", "summary"]
RESULTS = ["machine.json", "model.json", "engine.json", "serve-check.json", "serve-b1c256.json", "serve-b16c64.json",
           "train.json", "summary.json"]


def run_check(out: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DRY": "1", **env}, cwd="/")


def steps(out: Path) -> dict[str, str]:
    return {line.split("\t")[0]: line.split("\t")[1] for line in (out / "steps.tsv").read_text().splitlines()}


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_gpu_runs_files(tmp_path):
    out = tmp_path / "check"
    r = run_check(out, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert steps(out) == {s: "0" for s in STEPS}, (out / "steps.tsv").read_text()
    for name in RESULTS:
        result = json.loads((out / name).read_text())
        assert result["date"] and result["machine"] and result["command"], name
    engine = json.loads((out / "engine.json").read_text())
    # The precision the service would serve here (fp32 on a CPU), with its IO binding.
    assert {(row["precision"], row["io_binding"]) for row in engine["rows"]} == {("fp32", True)}
    model = json.loads((out / "model.json").read_text())
    assert model["fp16"]["kept"] and model["parity"]["images"] > 0  # kept whatever a random network's agreement
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and len(summary["serve"]) == 2
    assert all(row["precision"] == summary["engine"]["precision"] == "fp32" for row in summary["serve"])
    # Two shared cores may answer nothing within a one-second window; the loads they do answer have every
    # figure, the ratio against the engine in the served precision among them.
    answered = [row for row in summary["serve"] if row["images_per_s"] > 0]
    assert answered and all(row["p99_ms"] >= row["p50_ms"] > 0 for row in answered)
    for row in answered:  # the ratio, or why there is none (the batch histogram not read within the window)
        assert row.get("ratio_vs_engine_at_mean_batch", 0) > 0 or "no ratio" in row["ratio_note"]
    assert any("ratio_vs_engine_at_mean_batch" in row for row in answered)
    train = json.loads((out / "train.json").read_text())
    assert train["returncode"] == 0 and train["images_per_s"] > 0 and "tuneserve train" in train["train_command"]
    assert r.stdout.rstrip().splitlines()[-1].startswith("(p99 target")  # the table comes last
    assert not list(out.glob("**/*.onnx")) and not (out / "bentoml").exists()  # large scratch stays outside


def test_a_spent_budget_skips_steps_but_still_records_them_and_prints_the_table(tmp_path):
    out = tmp_path / "check"
    r = run_check(out, timeout=60, GPU_CHECK_BUDGET="0")
    assert r.returncode == 0, r.stdout + r.stderr
    recorded = steps(out)
    assert [s for s in recorded] == STEPS
    assert all(recorded[s] == "125" for s in STEPS[:-1]) and recorded["summary"] == "0"
    assert "not run: the 0 s budget was spent" in (out / "steps.tsv").read_text()
    assert "DRY RUN" in r.stdout and "(p99 target" in r.stdout
