#!/usr/bin/env bash
# The prepared device check (issue 18): one `device` run on an H100/H200 that builds the extension for sm_90,
# runs the CUDA tests, the benchmarks at Llama-8B shapes, and collect + quantize of stories260K on the GPU
# against the CPU, writing everything under $OUT. Budget: <= 8 minutes; each step has its own time limit and a
# failed step does not stop the others (its log says why). Correctness first (build, CUDA tests, the end-to-end
# comparison), then the benchmarks, so a run cut short still answers "does it work".
#
# Before sending it, on this machine (the model does not travel with ../shared):
#   mkdir -p device_data && cp -r ../shared/models/stories260K device_data/
# then: run(command="OUT=$OUT bash benchmarks/device_check.sh", carry=["device_data"], timeout_s=590)
# Locally (CPU part only): OUT=/tmp/check DEVICES=cpu bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder the results go to}
DEVICES=${DEVICES:-cuda}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record status and time
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

{
  date -u
  nvidia-smi 2>&1 | head -15
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())"
  "$PY" -c "import transformers, pytest; print('transformers', transformers.__version__, 'pytest', pytest.__version__)"
  "$PY" -c "import ninja" 2>/dev/null && echo "ninja: yes" || echo "ninja: no (serial build)"
} > "$OUT/env.txt" 2>&1

if [ "$DEVICES" = "cuda" ]; then
  step build 240 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" YAQA_BUILD=cuda "$PY" setup.py -q build_ext --inplace
  step pytest-cuda 120 "$PY" -m pytest -q tests -k cuda -p no:cacheprovider
fi
model=device_data/stories260K
[ -d "$model" ] || model=stories260K  # locally: found in ../shared/models
step compare 45 "$PY" benchmarks/device_compare.py --model "$model" --devices cpu $([ "$DEVICES" = cuda ] && echo cuda) \
  --out "$OUT/compare.json"
shapes=(4096x4096 14336x4096 4096x14336)
step bench-qlinear 40 "$PY" benchmarks/bench_qlinear.py --devices "$DEVICES" --shapes "${shapes[@]}" --batches 1 16 256
step bench-hadamard 20 "$PY" benchmarks/bench_hadamard.py --devices "$DEVICES" --sizes 4096 11008 14336
step bench-ldlq 40 "$PY" benchmarks/bench_ldlq.py --devices "$DEVICES" --compare 1024 --alone 4096 --tile 2
step bench-block-ldl 25 "$PY" benchmarks/bench_block_ldl.py --devices "$DEVICES" --sizes 4096 14336
step bench-sketch 40 "$PY" benchmarks/bench_sketch.py --devices "$DEVICES"
step bench-codebooks 40 "$PY" benchmarks/bench_codebooks.py --devices "$DEVICES" --shapes 4096x4096 --bits 2 4 \
  --batches 1 256
