#!/usr/bin/env bash
# The GPU checks in one go, on a machine with one CUDA GPU and layerprune's dependencies (about 6 minutes on an H100):
#
#   bench/gpu_check.sh [tests] [scale] [smollm2]     # default: all three, in this order
#
#   tests    pytest -m gpu: CPU and CUDA prune the same tiny model of every family alike, for every solver and
#            allocator (tests/test_gpu.py)
#   scale    ALPS against SparseGPT at 70% on two LLaMA-2-7B-shaped blocks (bench/scale.py), with the papers'
#            calibration (128 x 2048 C4 tokens) -> bench/results/scale_gpu_2b.json (median solve per block, and
#            ALPS's over SparseGPT's from the same run)
#   smollm2  the built-in SmolLM2-135M on the GPU: SparseGPT and ALPS at 70% and 2:4 (bench/alps_table.py, the CPU
#            table's protocol) -> bench/results/alps_gpu.json
#
# Each step runs even if an earlier one failed; the exit status is the number of failed steps. Logs go to $LOGS
# (default bench/results/gpu_logs). A copy of the tree without .git records its commit from .gpu/source.json
# (bench/common.py: code_version).
set -u
LOGS=${LOGS:-bench/results/gpu_logs}
mkdir -p "$LOGS"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests scale smollm2)
failed=0
for step in "${steps[@]}"; do
  echo "== $step $(date -u +%FT%TZ)"
  case $step in
    tests) python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --durations=5 ;;
    scale) python -m bench.scale --device cuda --blocks 2 --methods sparsegpt-70,alps-70 --nsamples 128 \
             --seqlen 2048 ${TOKENIZER:+--tokenizer "$TOKENIZER"} --work "${WORK:-/tmp/layerprune-scale}" ;;
    smollm2) python -m bench.alps_table --device cuda --only "sparsegpt 70%,alps 70%,sparsegpt 2:4,alps 2:4" ;;
    *) echo "unknown step $step (tests, scale, smollm2)"; false ;;
  esac > >(tee "$LOGS/$step.log") 2>&1
  rc=$?
  echo "== $step rc=$rc"
  [ $rc -ne 0 ] && failed=$((failed + 1))
done
exit $failed
