#!/usr/bin/env bash
# Prefill every retrieved chunk once into the chunk store -> results/kv_caches/<dataset>_kv_top<k>.json
# Env overrides: DATASET, TOP_K, RETRIEVAL_MODE, SCOPE, MODEL, DTYPE, DEVICE, LIMIT, TOP_K_GPU, GPU_BUDGET,
#                CPU_BUDGET, RESULTS_DIR, CONFIG
set -euo pipefail
source "$(dirname "$0")/_common.sh"
: "${DATASET:=musique_s}" "${TOP_K:=5}" "${RETRIEVAL_MODE:=bm25}"
opt DATASET --dataset; opt TOP_K --top-k; opt RETRIEVAL_MODE --retrieval-mode; opt SCOPE --scope
opt MODEL --model; opt DTYPE --dtype; opt DEVICE --device; opt LIMIT --limit; opt TOP_K_GPU --top-k-gpu
opt GPU_BUDGET --gpu-budget; opt CPU_BUDGET --cpu-budget; opt RESULTS_DIR --results-dir; opt CONFIG --config
exec "$KVBLEND" build "${FLAGS[@]}" "$@"
