#!/usr/bin/env bash
# Token budget: KV bytes per token and how many tokens / chunks fit in a GPU (kvblend budget).
# SWEEP=1: decode at GPU budgets of 1..TOP_K chunks, with and without promotions (kvblend budget --sweep)
#          -> results/decoding/<dataset>_budget_sweep.json
# Env overrides: MODEL (llama-3-8b for the table; the engine model for the sweep), GPU_MEM (80GiB), DTYPE,
#                CHUNK_TOKENS; for SWEEP=1 also DATASET, LIMIT, TOP_K, DEVICE, DRAFTER, DRAFT_MODEL, PROXY, RESULTS_DIR
set -euo pipefail
source "$(dirname "$0")/_common.sh"
if [[ "${SWEEP:-0}" == "1" ]]; then
  : "${DATASET:=musique_s}" "${TOP_K:=5}"
  opt MODEL --model; opt DTYPE --dtype; opt DATASET --dataset; opt LIMIT --limit; opt TOP_K --top-k
  opt DEVICE --device; opt DRAFTER --drafter; opt DRAFT_MODEL --draft-model; opt PROXY --proxy
  opt RESULTS_DIR --results-dir; opt CONFIG --config
  exec "$KVBLEND" budget --sweep "${FLAGS[@]}" "$@"
fi
: "${MODEL:=llama-3-8b}" "${GPU_MEM:=80GiB}"
opt MODEL --model; opt GPU_MEM --gpu-mem; opt DTYPE --dtype; opt CHUNK_TOKENS --chunk-tokens
exec "$KVBLEND" budget "${FLAGS[@]}" "$@"
