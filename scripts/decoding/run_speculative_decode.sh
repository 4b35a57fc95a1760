#!/usr/bin/env bash
# Answer every sample from the chunk store -> results/decoding/<dataset>_<mode>.json
# Env overrides: DATASET, TOP_K, RETRIEVAL_MODE, SCOPE, MODEL, DTYPE, DEVICE, LIMIT, MODE (full|reuse|blend),
#                RATIO, MAX_NEW_TOKENS, TOP_K_GPU, RESULTS_DIR, CONFIG
set -euo pipefail
source "$(dirname "$0")/../_common.sh"
: "${DATASET:=musique_s}" "${TOP_K:=5}" "${RETRIEVAL_MODE:=bm25}" "${MODE:=blend}"
opt DATASET --dataset; opt TOP_K --top-k; opt RETRIEVAL_MODE --retrieval-mode; opt SCOPE --scope
opt MODEL --model; opt DTYPE --dtype; opt DEVICE --device; opt LIMIT --limit; opt MODE --mode; opt RATIO --ratio
opt MAX_NEW_TOKENS --max-new-tokens; opt TOP_K_GPU --top-k-gpu; opt RESULTS_DIR --results-dir; opt CONFIG --config
exec "$KVBLEND" decode "${FLAGS[@]}" "$@"
