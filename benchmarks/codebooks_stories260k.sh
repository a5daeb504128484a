#!/usr/bin/env bash
# Issue 14's stories260K rows of benchmarks/results/quality.md: rtn, ldlq and yaqa-B with the INT grid, E8P and
# the trellis codebook at 2, 3 and 4 bits, 3 seeds, RHT, with the settings of the stories260K tables (calibration
# 128 x 256, evaluation 64 x 256); every run reads the same factor files. stories260K's MLP matrices (172 wide) fit
# neither E8P's 8 columns (down_proj) nor the trellis' 16 x 16 tiles (all three): those stay in float. So each
# codebook is also compared at equal coverage: INT and E8P with the MLP skipped (the trellis' matrices), and INT
# with down_proj skipped (E8P's). Resumable.
#   bash benchmarks/codebooks_stories260k.sh
set -euo pipefail
cd "$(dirname "$0")/.."
hessians=$(realpath -m "${HESSIANS:-yaqa_out/stories260k-hessians}")
base=${OUT:-benchmarks/results/codebooks-stories260k}
run() {  # folder, quantizer, extra arguments
  mkdir -p "$hessians" "$1"
  ln -sfn "$hessians" "$1/hessians"
  .venv/bin/yaqa run --model stories260K --n-seqs 128 --seq-len 256 --eval-seqs 64 --eval-len 256 \
    --methods ${METHODS:-rtn ldlq yaqa-B} --bits ${BITS:-2 3 4} --quantizer "$2" --seeds ${SEEDS:-0 1 2} --out "$1" "${@:3}"
}
for quantizer in int e8p trellis; do run "$base/$quantizer" "$quantizer"; done
for quantizer in int e8p; do run "$base/attention-only/$quantizer" "$quantizer" --skip 'mlp\.'; done
run "$base/no-down-proj/int" int --skip 'down_proj'
