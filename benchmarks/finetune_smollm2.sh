#!/usr/bin/env bash
# Issue 11's fine-tuning rows of benchmarks/results/quality.md: ldlq and yaqa-B with per-block fine-tuning (2 epochs,
# lr 1e-3, channel scales trained) on SmolLM2-135M, RHT, N calibration sequences of 512 tokens (the same sequences
# fine-tune), evaluation 64 x 256. Resumable like quality_smollm2.sh; the factor files are shared with
# shrinkage_smollm2.sh (N = 32: $HESSIANS/n32). The rows without fine-tuning are in shrinkage-smollm2/nN.
#   N=32 BITS="2 4" SEEDS=1 bash benchmarks/finetune_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
n=${N:-32}
out=${OUT:-benchmarks/results/finetune-smollm2}/n$n
hessians=$(realpath -m "${HESSIANS:-yaqa_out/quality-smollm2-hessians}")
[ "$n" = 128 ] || hessians="$hessians/n$n"
mkdir -p "$hessians" "$out"
ln -sfn "$hessians" "$out/hessians"
for method in ${METHODS:-ldlq yaqa-B}; do
  .venv/bin/yaqa run --model smollm2-135m --n-seqs "$n" --seq-len 512 --eval-seqs 64 --eval-len 256 \
    --methods "$method" --bits ${BITS:-2 4} --seeds ${SEEDS:-1} --finetune-epochs 2 --out "$out"
done
