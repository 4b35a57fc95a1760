#!/usr/bin/env bash
# Prefill every retrieved chunk once into the chunk store -> results/kv_caches/<dataset>_kv_top<k>.json
# Env overrides: DATASET, TOP_K, RETRIEVAL_MODE (both), SCOPE, MODEL, DTYPE, DEVICE, LIMIT, GPU_CHUNKS (placement
#                recorded per sample; TOP_K_GPU: old name), START_TIER, GPU_BUDGET, CPU_BUDGET, RESULTS_DIR, CONFIG
# A retrieval file that lacks samples of this LIMIT (or was made with other settings) is retrieved again first.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
: "${DATASET:=musique_s}" "${TOP_K:=5}" "${RETRIEVAL_MODE:=both}"
opt DATASET --dataset; opt TOP_K --top-k; opt RETRIEVAL_MODE --retrieval-mode; opt SCOPE --scope
opt MODEL --model; opt DTYPE --dtype; opt DEVICE --device; opt LIMIT --limit; GPU_CHUNKS="${GPU_CHUNKS:-${TOP_K_GPU:-}}"; opt GPU_CHUNKS --gpu-chunks; opt START_TIER --start-tier
opt GPU_BUDGET --gpu-budget; opt CPU_BUDGET --cpu-budget; opt RESULTS_DIR --results-dir; opt CONFIG --config
exec "$KVBLEND" build "${FLAGS[@]}" "$@"
