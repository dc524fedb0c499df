#!/usr/bin/env bash
# Decode + preprocess per thread count on this machine's cores (what feeds the service). About 3 minutes.
#   benchmarks/gpu_extra/decode.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: benchmarks/gpu_extra/decode.sh OUTDIR}; mkdir -p "$out" && out=$(cd "$out" && pwd)
budget=${GPU_BUDGET:-540}
source benchmarks/gpu_steps.sh
step machine 60 "$py" benchmarks/machine_info.py --out "$out/machine.json"
photos_step --train 64 --val 256 --classes 8
step decode 300 "$py" benchmarks/decode.py --images "$scratch/photos/val" --sizes 500x375,4032x3024 --factors 0,3 \
  --threads 1,8,16 --out "$out/decode.json"
cat "$out/steps.tsv"
