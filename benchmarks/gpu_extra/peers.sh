#!/usr/bin/env bash
# Against other serving frameworks on this host (benchmarks/peers/): BentoML's examples' style always; LitServe
# and Ray Serve where benchmarks/peers/setup.sh installed them (they need a registry: stage them beforehand).
# About 8 minutes.
#   benchmarks/gpu_extra/peers.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: benchmarks/gpu_extra/peers.sh OUTDIR}; mkdir -p "$out" && out=$(cd "$out" && pwd)
budget=${GPU_BUDGET:-540}
source benchmarks/gpu_steps.sh
step machine 60 "$py" benchmarks/machine_info.py --out "$out/machine.json"
photos_step --train 64 --val 128 --classes 8
peers=tuneserve,bentoml-gallery
[ -x benchmarks/peers/.venv/bin/python ] && peers=$peers,litserve,litserve-same-pre,ray-serve
step peers 450 "$py" benchmarks/peers/compare.py --servers "$peers" --bentoml-home "$BENTOML_HOME" \
  --images "$scratch/photos/val" --clients 1,16,64,256 --out "$out/peers.json"
cat "$out/steps.tsv"
