# Sourced by benchmarks/gpu_check.sh and benchmarks/gpu_extra/*.sh, from the repository root, after `out` (the
# results folder, absolute) is set: the Python to run, the import path, a scratch folder outside the results
# (photos, model store, run folders: large, removed on exit unless KEEP_SCRATCH=1, shared between scripts when
# GPU_SCRATCH names one), and `step`, which runs one measurement under `timeout` and records it.
#
# Nothing here reads ../shared or fetches anything: photos are generated, models have random weights.

py=${PYTHON:-$(command -v python3 || command -v python)}
[ -n "$py" ] || { echo "error: no python3 or python on PATH (set PYTHON)" >&2; exit 2; }
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${GPU_SCRATCH:-}" ]; then
  scratch=$GPU_SCRATCH && mkdir -p "$scratch"
else
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/tuneserve-gpu.XXXXXX")
  [ "${KEEP_SCRATCH:-0}" = 1 ] || trap 'rm -rf "$scratch"' EXIT
fi
export BENTOML_HOME=$scratch/bentoml BENTOML_DO_NOT_TRACK=True
budget=${GPU_BUDGET:-${budget:-600}}
t_start=$SECONDS
touch "$out/steps.tsv"

# step NAME LIMIT_S COMMAND...: run under `timeout` (its whole process group), at most LIMIT_S and at most what
# the budget leaves; output to OUTDIR/NAME.log; one line `name, exit status, seconds, limit, log` in steps.tsv
# whatever happens (124: timed out; 125: not run, the budget was spent). Never stops the calling script.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((budget - (SECONDS - t_start)))
  local t=$((limit < left ? limit : left))
  if [ "$t" -lt 5 ]; then
    printf '%s\t%s\t0\t0\t%s\n' "$name" 125 "(not run: the ${budget} s budget was spent)" >> "$out/steps.tsv"
    echo "[gpu] $name: not run, budget spent"
    return 0
  fi
  echo "[gpu] $name (at most ${t} s) ..."
  local t0=$SECONDS
  timeout -k 15 "$t" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$t" "$name.log" >> "$out/steps.tsv"
  echo "[gpu] $name: exit $rc after $((SECONDS - t0)) s"
  return 0
}

# photos_step [make_photos.py flags]: generated JPEGs in $scratch/photos (train/, val/), once per scratch folder.
photos_step() {
  [ -d "$scratch/photos/val" ] && return 0
  step photos 90 "$py" benchmarks/make_photos.py "$scratch/photos" "$@"
}

# model_step NAME ARCH [speed_model.py flags]: a random-weight model registered with its fp16 variant, once.
model_step() {
  local name=$1 arch=$2; shift 2
  [ -d "$BENTOML_HOME/models/$name" ] && return 0
  step model 150 "$py" benchmarks/speed_model.py --arch "$arch" --name "$name" --images "$scratch/photos/val" \
    --out "$out/model.json" "$@"
}
