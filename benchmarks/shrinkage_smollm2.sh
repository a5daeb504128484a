#!/usr/bin/env bash
# Issue 11's shrinkage rows of benchmarks/results/quality.md: ldlq, yaqa-B and yaqa-B-lw (Sketch B shrunk toward
# its per-token part, yaqa_ext.shrinkage) on SmolLM2-135M at 3 and 4 bits (and 2), RHT, for N calibration
# sequences of 512 tokens; evaluation 64 x 256 as in quality_smollm2.sh. Resumable like it (rows in the repository,
# factor files in $HESSIANS, shared with quality_smollm2.sh: its 128-sequence collections are reused).
#   NS="32 128" SEEDS=1 bash benchmarks/shrinkage_smollm2.sh
#   NS=1024 METHODS="ldlq yaqa-B" BITS="3 4" bash benchmarks/shrinkage_smollm2.sh   # the data study's large points
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/shrinkage-smollm2}
hessians=$(realpath -m "${HESSIANS:-yaqa_out/quality-smollm2-hessians}")
for n in ${NS:-32 128}; do
  mkdir -p "$hessians/n$n" "$out/n$n"
  [ "$n" = 128 ] && ln -sfn "$hessians" "$out/n$n/hessians" || ln -sfn "$hessians/n$n" "$out/n$n/hessians"
  .venv/bin/yaqa run --model smollm2-135m --n-seqs "$n" --seq-len 512 --eval-seqs 64 --eval-len 256 \
    --methods ${METHODS:-ldlq yaqa-B yaqa-B-lw} --bits ${BITS:-2 3 4} --seeds ${SEEDS:-1} --out "$out/n$n"
done
