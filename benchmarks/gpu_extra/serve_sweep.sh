#!/usr/bin/env bash
# Serving beyond the check: 1, 2 and 4 worker processes at 256 connections (single-image JPEG requests), each
# against the engine alone in the precision the service served; then an open-loop latency-throughput curve.
# About 8 minutes.
#   benchmarks/gpu_extra/serve_sweep.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: benchmarks/gpu_extra/serve_sweep.sh OUTDIR}; mkdir -p "$out" && out=$(cd "$out" && pwd)
budget=${GPU_BUDGET:-540}
source benchmarks/gpu_steps.sh
model=gpu-check-resnet50
step machine 60 "$py" benchmarks/machine_info.py --out "$out/machine.json"
photos_step --train 64 --val 512 --classes 8
model_step "$model" resnet50
step engine 120 "$py" benchmarks/engine.py --model "$model" --precisions served --io-binding on --nhwc on \
  --batch-sizes 1,8,32,64,128,256 --seconds 2 --out "$out/engine.json"
for w in 1 2 4; do
  mkdir -p "$out/workers-$w" && cp -f "$out/engine.json" "$out/machine.json" "$out/workers-$w/" 2>/dev/null
  step "serve-workers-$w" 110 "$py" benchmarks/serve_check.py --model "$model" --images "$scratch/photos/val" \
    --loads 1x256 --outdir "$out/workers-$w" --env "TUNESERVE_WORKERS=$w" --load-timeout 70 -- \
    --duration 15 --warmup 5 --processes 4 --engine-seconds 0.5
  step "summary-workers-$w" 30 "$py" benchmarks/gpu_check_summary.py "$out/workers-$w"
done
step serve-open-loop 150 "$py" benchmarks/serve_load.py --start --model "$model" --images "$scratch/photos/val" \
  --rate 2000,4000,6000,8000 --processes 8 --duration 15 --warmup 5 --engine-seconds 0.5 --out "$out/serve-open-loop.json"
cat "$out/steps.tsv"
