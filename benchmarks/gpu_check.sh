#!/usr/bin/env bash
# The headline GPU figures in one command of at most 8 minutes, on a bare GPU machine (docs/gpu.md):
#   (a) engine alone: ResNet-50 in the precision the service serves (fp16 where kept), IO binding, NHWC,
#       batch 1 to 256 (batch 128 is the target's);
#   (b) serving end to end: JPEG requests of 1 and 16 images at 64 and 256 closed-loop connections, img/s,
#       p50/p99, and end to end / engine alone in the same precision;
#   (c) fine-tuning img/s from a JPEG folder through `tuneserve train` with its defaults for the device.
#
#   source .gpu/install.sh && benchmarks/gpu_check.sh "$OUT/check"     # on the GPU machine
#   GPU_CHECK_DRY=1 benchmarks/gpu_check.sh /tmp/check                 # rehearsal on CPU, in about a minute
#
# OUTDIR gets the logs and results JSON (machine.json, model.json, engine.json, serve-b{1,16}c{64,256}.json,
# serve-check.json, train.json, summary.json; each with the command, machine and date) and steps.tsv (each step's
# exit status, seconds and time limit); the short table is printed last. Nothing is read from ../shared and
# nothing is fetched: the photos are generated (benchmarks/make_photos.py), the model has random weights
# (benchmarks/speed_model.py: registered with its fp16 variant whatever a random network's top-1 agreement,
# so no parity gate can stop the check). Photos, the model store and the run folder live in a scratch folder
# outside OUTDIR (large; removed at the end, KEEP_SCRATCH=1 keeps it).
#
# Every step runs under `timeout`, within an overall budget (GPU_CHECK_BUDGET seconds, default 450: the lease's
# 8-minute command with room for the summary); a step that fails or times out is recorded and the next runs
# (benchmarks/gpu_steps.sh). Python: $PYTHON, else python3, else python.
set -uo pipefail  # no -e: one failed step must not stop the others
cd "$(dirname "$0")/.."

out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
budget=${GPU_CHECK_BUDGET:-450}
: > "$out/steps.tsv"
source benchmarks/gpu_steps.sh  # $py, PYTHONPATH, $scratch and BENTOML_HOME outside OUTDIR, step()
dry=${GPU_CHECK_DRY:-0}
model=gpu-check-resnet50

if [ "$dry" = 1 ]; then
  # The same steps in seconds on a CPU: tiny photos and model, one-second loads after half a second of
  # warm-up, one load of each request kind (the 1-image one at the most connections). Not a measurement.
  arch=resnet18; model_flags="--image-size 64 --parity-images 8"
  photo_flags="--train 32 --val 16 --classes 4 --scale 0.3"
  engine_flags="--batch-sizes 1,8 --seconds 0.2"
  load_flags="--duration 1 --warmup 0.5 --processes 1 --engine-seconds 0.1"
  loads=1x256,16x64
  train_flags="--arch $arch --weights none --image-size 64 --epochs 1 --head-epochs 0 --batch-size 8 --no-export"
  load_timeout=60
else
  arch=resnet50; model_flags=""
  photo_flags="--train 8192 --val 512 --classes 8"
  engine_flags="--batch-sizes 1,32,64,128,256 --seconds 2"
  # 4 generator processes: one tops out at a few thousand requests/s (benchmarks/serve_load.py).
  load_flags="--duration 12 --warmup 4 --processes 4 --engine-seconds 0.5"
  loads=1x256,16x256,1x64,16x64
  # Users' defaults on CUDA (cache pipeline, bf16, channels_last, cuDNN autotuning); a batch an H100 fills.
  train_flags="--arch resnet50 --weights none --epochs 3 --head-epochs 0 --batch-size 256 --no-export"
  load_timeout=75
fi
# No end-of-run diagnostics: their pass over every photo and the label-issue regression count nothing towards
# the img/s this step reports, and take the budget's time (8,192 photos on the GPU run).
train_flags="$train_flags --no-diagnostics"
photos=$scratch/photos

step machine 60 "$py" benchmarks/machine_info.py --out "$out/machine.json"
photos_step $photo_flags
model_step "$model" "$arch" $model_flags
step engine 120 "$py" benchmarks/engine.py --model "$model" --precisions served --io-binding on --nhwc on \
  $engine_flags --out "$out/engine.json"
step train 150 "$py" benchmarks/train_check.py --data "$photos" --runs "$scratch/runs" --log "$out/train-run.log" \
  --out "$out/train.json" -- $train_flags --cache-dir "$scratch/cache"
# Last: a cut-short serve step keeps the loads it finished (one JSON each), the 256-connection ones first.
step serve 300 "$py" benchmarks/serve_check.py --model "$model" --images "$photos/val" --loads "$loads" \
  --outdir "$out" --load-timeout "$load_timeout" -- $load_flags

# The table, whatever the budget says (it reads files; a few seconds).
budget=$((budget + 30))
step summary 30 "$py" benchmarks/gpu_check_summary.py "$out" $([ "$dry" = 1 ] && echo --dry)
cat "$out/summary.log"
