#!/usr/bin/env bash
# The default fine-tuning recipe on whole photo sets beside a linear probe (benchmarks/accuracy.py). Needs the
# real sets, carried in the command's paths and named by $TUNESERVE_DATASETS (hymenoptera, leeds-butterfly,
# rsscn7), and the offline Lite0 weights package. ACCURACY_SETS picks the sets (default: every one, about 25
# minutes on an H100: run it on a lease of its own, or a few sets per command).
#   TUNESERVE_DATASETS=datasets ACCURACY_SETS=rsscn7 benchmarks/gpu_extra/accuracy.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: benchmarks/gpu_extra/accuracy.sh OUTDIR}; mkdir -p "$out" && out=$(cd "$out" && pwd)
budget=${GPU_BUDGET:-540}
source benchmarks/gpu_steps.sh
datasets=${TUNESERVE_DATASETS:-}
if [ -z "$datasets" ] || [ ! -d "$datasets" ]; then
  echo "error: set TUNESERVE_DATASETS to a folder of the real photo sets carried with the command (got '${datasets}')" >&2
  exit 2
fi
export TUNESERVE_DATASETS=$(cd "$datasets" && pwd)
sets=${ACCURACY_SETS:-hymenoptera,leeds-butterfly,rsscn7,leeds-butterfly-64px,rsscn7-64px,rsscn7-imbalanced,rsscn7-grey-dominant}
step machine 60 "$py" benchmarks/machine_info.py --out "$out/machine.json"
step accuracy $((budget - 60)) "$py" benchmarks/accuracy.py --sets "$sets" --out "$out/accuracy.json"
cat "$out/steps.tsv"
