#!/usr/bin/env bash
# Training input pipelines against synthetic tensors (does JPEG decoding bound training?): ResNet-50 and
# EfficientNet-Lite0, synthetic / PIL workers / decoded-image cache, torch.compile on. About 6 minutes.
#   benchmarks/gpu_extra/train_throughput.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: benchmarks/gpu_extra/train_throughput.sh OUTDIR}; mkdir -p "$out" && out=$(cd "$out" && pwd)
budget=${GPU_BUDGET:-540}
source benchmarks/gpu_steps.sh
step machine 60 "$py" benchmarks/machine_info.py --out "$out/machine.json"
photos_step --train 8192 --val 512 --classes 8
step train-throughput 420 "$py" benchmarks/train_throughput.py --archs resnet50,efficientnet_lite0 \
  --data "$scratch/photos" --replicate 1 --batch-size 256 --compile --out "$out/train-throughput.json"
cat "$out/steps.tsv"
