#!/usr/bin/env bash
# Engine alone, every variant: ResNet-50 (random weights) fp32/fp16 x IO binding x NHWC at batch 1-256.
# Which onnxruntime options the service should default to on this GPU. About 4 minutes.
#   benchmarks/gpu_extra/engine_variants.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: benchmarks/gpu_extra/engine_variants.sh OUTDIR}; mkdir -p "$out" && out=$(cd "$out" && pwd)
budget=${GPU_BUDGET:-540}
source benchmarks/gpu_steps.sh
step machine 60 "$py" benchmarks/machine_info.py --out "$out/machine.json"
step engine-variants 450 "$py" benchmarks/engine.py --arch resnet50 --batch-sizes 1,32,64,128,256 --seconds 3 \
  --out "$out/engine-variants.json"
cat "$out/steps.tsv"
