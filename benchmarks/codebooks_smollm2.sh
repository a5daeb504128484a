#!/usr/bin/env bash
# The vector / trellis codebook rows of benchmarks/results/quality.md (issue 14): rtn, ldlq and yaqa-B on
# SmolLM2-135M with QUANTIZER=e8p (E8 lattice, 2 bits; 3 and 4 with a residual stage) or QUANTIZER=trellis
# (bitshift trellis, L = 12), RHT, calibration 128 x 512 tokens, evaluation 64 x 256: the settings of
# benchmarks/quality_smollm2.sh, whose INT rows they compare with (the same factor files). Resumable.
#   QUANTIZER=trellis METHODS="yaqa-B ldlq" BITS=2 SEEDS=1 bash benchmarks/codebooks_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
quantizer=${QUANTIZER:-e8p}
out=${OUT:-benchmarks/results/$quantizer-smollm2}
hessians=$(realpath -m "${HESSIANS:-yaqa_out/quality-smollm2-hessians}")
mkdir -p "$hessians" "$out/rht"
ln -sfn "$hessians" "$out/rht/hessians"
for seed in ${SEEDS:-1}; do
  .venv/bin/yaqa run --model smollm2-135m --n-seqs 128 --seq-len 512 --eval-seqs 64 --eval-len 256 \
    --methods ${METHODS:-rtn ldlq yaqa-B} --bits ${BITS:-2 3 4} --quantizer "$quantizer" --seeds "$seed" --out "$out/rht"
done
