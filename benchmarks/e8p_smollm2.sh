#!/usr/bin/env bash
# The E8P rows of benchmarks/results/quality.md (issue 14): rtn, ldlq and yaqa-B on SmolLM2-135M with the E8P
# lattice codebook (2 bits; 3 and 4 bits with a residual stage), RHT, calibration 128 x 512 tokens, evaluation
# 64 x 256: the settings of benchmarks/quality_smollm2.sh, whose INT rows they compare with (same factor files).
# Resumable: run it again and finished rows are kept.
#   SEEDS="1" bash benchmarks/e8p_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/e8p-smollm2}
hessians=$(realpath -m "${HESSIANS:-yaqa_out/quality-smollm2-hessians}")
mkdir -p "$hessians" "$out/rht"
ln -sfn "$hessians" "$out/rht/hessians"
for seed in ${SEEDS:-1}; do
  .venv/bin/yaqa run --model smollm2-135m --n-seqs 128 --seq-len 512 --eval-seqs 64 --eval-len 256 \
    --methods ${METHODS:-rtn ldlq yaqa-B} --bits ${BITS:-2 3 4} --quantizer e8p --seeds "$seed" --out "$out/rht"
done
