#!/usr/bin/env bash
# The SmolLM2-135M rows of benchmarks/results/quality.md: every method at 2, 3 and 4 bits with RHT and
# without, plus YAQA-B with rank-32 low-rank terms; calibration 128 x 512 tokens, evaluation 64 x 256.
# Seed by seed (all rows of one seed before the next), resumable: run it again and finished rows are kept.
# Both settings use the same factor files (a collection depends on the seed, not on the RHT).
# The finished rows (results.json / results.md) live in the repository, so a run spread over several
# machines keeps every row; the factor files (~0.5 GB a seed) go to $HESSIANS, outside it.
#   SEEDS="0 1 2" bash benchmarks/quality_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/quality-smollm2}
hessians=$(realpath -m "${HESSIANS:-yaqa_out/quality-smollm2-hessians}")
methods=(rtn datafree ldlq yaqa-A yaqa-B yaqa-B+svd:32 yaqa-B+qera-exact:32 yaqa-B+kl:32)
common=(--model smollm2-135m --n-seqs 128 --seq-len 512 --eval-seqs 64 --eval-len 256 --methods "${methods[@]}")
mkdir -p "$hessians" "$out/rht" "$out/norht"
ln -sfn "$hessians" "$out/rht/hessians"
ln -sfn "$hessians" "$out/norht/hessians"
for seed in ${SEEDS:-0 1 2}; do
  .venv/bin/yaqa run "${common[@]}" --seeds "$seed" --out "$out/rht"
  .venv/bin/yaqa run "${common[@]}" --seeds "$seed" --out "$out/norht" --no-rht
done
