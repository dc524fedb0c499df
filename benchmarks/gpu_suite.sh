#!/usr/bin/env bash
# Every GPU measurement docs/benchmarks.md needs, for a machine kept longer than one command: the headline check
# (benchmarks/gpu_check.sh, at most 8 minutes) first, then each script of benchmarks/gpu_extra/ (each at most
# 9 minutes, so that each can also be sent as one command of a lease; docs/gpu.md lists them and what each
# carries). The targets (H100): engine >= 13,000 img/s fp16 at batch 128; end to end >= 6,000 img/s single-image
# and >= 8,000 img/s in 16-image requests at 256 clients, p99 <= 100 ms; training ResNet-50 from JPEG files
# >= 5,000 img/s and >= 0.9 x synthetic.
#
#   benchmarks/gpu_suite.sh OUTDIR [SCRIPT...]      # SCRIPT: names in benchmarks/gpu_extra/ (default: all but accuracy)
#
# OUTDIR/check/ holds the check's results, OUTDIR/<script>/ each script's. Photos and the model are made once and
# shared between the scripts (one scratch folder). A script that fails does not stop the next; each writes its
# steps.tsv. Nothing is read from ../shared: accuracy.sh, which needs the real photo sets, runs only when named
# (with TUNESERVE_DATASETS set).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_suite.sh OUTDIR [SCRIPT...]}; shift
mkdir -p "$out" && out=$(cd "$out" && pwd)
scripts=("$@")
[ ${#scripts[@]} -gt 0 ] || scripts=(engine_variants train_throughput decode serve_sweep host_cost peers)
export GPU_SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/tuneserve-gpu-suite.XXXXXX")
[ "${KEEP_SCRATCH:-0}" = 1 ] || trap 'rm -rf "$GPU_SCRATCH"' EXIT

bash benchmarks/gpu_check.sh "$out/check" 2>&1 | tee "$out/check.log"
for s in "${scripts[@]}"; do
  [ -f "benchmarks/gpu_extra/$s.sh" ] || { echo "no benchmarks/gpu_extra/$s.sh" | tee -a "$out/suite.log"; continue; }
  echo "== $s" | tee -a "$out/suite.log"
  bash "benchmarks/gpu_extra/$s.sh" "$out/$s" 2>&1 | tee "$out/$s.log" | tail -20
  echo "$s: exit ${PIPESTATUS[0]}" | tee -a "$out/suite.log"
done
echo "results in $out"
