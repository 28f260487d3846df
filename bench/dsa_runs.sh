#!/usr/bin/env bash
# DSA allocation-function search on SmolLM2-135M: evolution vs random search at equal time budgets, 70% and 60%,
# then the full-protocol table (bench.dsa_eval) and the spread-vs-function check at 70% (bench.dsa_spread).
# Each step takes the shared heavy-job lock on its own.
# Usage: bash bench/dsa_runs.sh [MINUTES_70] [MINUTES_60]
set -euo pipefail
cd "$(dirname "$0")/.."
M70=${1:-20}
M60=${2:-10}
LP=".venv/bin/python -m layerprune"
for s in 70 60; do
  m=$([ "$s" = 70 ] && echo "$M70" || echo "$M60")
  for strat in evolutionary random; do
    flock /tmp/lp_heavy.lock $LP search-allocation --model smollm2-135m --sparsity 0.$s --strategy $strat \
      --budget-minutes "$m" --seed 0 --out runs/dsa/s$s-$strat --force
  done
done
flock /tmp/lp_heavy.lock .venv/bin/python -m bench.dsa_eval --runs runs/dsa --sparsities 0.7,0.6 \
  --out bench/results/dsa
flock /tmp/lp_heavy.lock .venv/bin/python -m bench.dsa_spread
