#!/usr/bin/env bash
# What the host's CPUs spend per image: the Open Inference Protocol's infer route against /classify, server CPU
# per request, and JPEG decoding on the GPU (nvImageCodec + CV-CUDA, where installed) against the CPU path.
# About 8 minutes. The photos these scripts read from "hymenoptera" are generated ($TUNESERVE_DATASETS).
#   benchmarks/gpu_extra/host_cost.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: benchmarks/gpu_extra/host_cost.sh OUTDIR}; mkdir -p "$out" && out=$(cd "$out" && pwd)
budget=${GPU_BUDGET:-540}
source benchmarks/gpu_steps.sh
model=gpu-check-resnet50
step machine 60 "$py" benchmarks/machine_info.py --out "$out/machine.json"
[ -d "$scratch/datasets/hymenoptera/val" ] || step photos-hymenoptera 90 "$py" benchmarks/make_photos.py \
  "$scratch/datasets/hymenoptera" --train 64 --val 128 --names ants,bees
export TUNESERVE_DATASETS=$scratch/datasets  # benchmarks/shared_data.py: where these scripts look for photos
photos_step --train 64 --val 128 --classes 8
model_step "$model" resnet50
step protocols 150 "$py" benchmarks/protocols.py --env "TUNESERVE_MODELS=$model" --clients 256 --out "$out/protocols.json"
step request-cpu 120 "$py" benchmarks/request_cpu.py --env "TUNESERVE_MODELS=$model" --out "$out/request-cpu.json"
for decode in auto off; do
  step "host-cost-gpu-decode-$decode" 100 "$py" benchmarks/host_cost.py --env "TUNESERVE_GPU_DECODE=$decode" \
    --label "gpu decode $decode" --out "$out/host-cost-gpu-decode-$decode.json"
done
cat "$out/steps.tsv"
