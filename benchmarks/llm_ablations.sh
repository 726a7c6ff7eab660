#!/usr/bin/env bash
# Ablations quoted in docs/benchmarks.md (LLM sparsity section), each a run of benchmarks/llm.py:
#   1. SparseGPT 2:4 float-order noise: block size 64 / 256 (mathematically the same computation for N:M;
#      block size 128 is the main table's row), 32 calibration / 16 evaluation windows.
#   2. OWL hyper-parameters (outlier threshold M, span lambda), Wanda 50%, 8 / 8 windows.
#   3. Span of the sensitivity allocation, SparseGPT 50%, 8 / 8 windows.
# Results: benchmarks/results/llm_ablation_*.json (one file per run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=benchmarks/results
run() { out=$1; shift; "$PY" benchmarks/llm.py --threads 2 --sections sparse "$@" --out "$R/llm_ablation_$out.json" 2>/dev/null | grep '^|'; }
for bs in 64 256; do
  run "sgpt24_bs$bs" --calib 32 --windows 16 --runs "sparsegpt 2:4" --override "{\"blocksize\": $bs}"
done
run owl_base --calib 8 --windows 8 --runs "wanda 50%,wanda 50% + OWL"
for ml in "5 0.02" "5 0.05" "5 0.12" "3 0.08" "7 0.08" "10 0.08"; do
  set -- $ml
  run "owl_m$1_l$2" --calib 8 --windows 8 --runs "wanda 50% + OWL" --override "{\"owl_m\": $1, \"owl_lambda\": $2}"
done
run sens_base --calib 8 --windows 8 --runs "sparsegpt 50%,sparsegpt 50% + sensitivity"
for l in 0.12 0.16; do
  run "sens_l$l" --calib 8 --windows 8 --runs "sparsegpt 50% + sensitivity" --owl-lambda $l
done
