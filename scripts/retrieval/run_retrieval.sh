#!/usr/bin/env bash
# Retrieve top-k chunks per question -> results/retrieval/<dataset>_rag_<mode>_k<k>.json (default mode both)
# Env overrides: DATASET (musique_s), TOP_K (5), RETRIEVAL_MODE (both (default)|bm25|dense|colbert), SCOPE (per_sample|pooled),
#                LIMIT, SEED, RESULTS_DIR, CONFIG
set -euo pipefail
source "$(dirname "$0")/../_common.sh"
: "${DATASET:=musique_s}" "${TOP_K:=5}" "${RETRIEVAL_MODE:=both}"
opt DATASET --dataset; opt TOP_K --top-k; opt RETRIEVAL_MODE --retrieval-mode; opt SCOPE --scope
opt LIMIT --limit; opt SEED --seed; opt RESULTS_DIR --results-dir; opt CONFIG --config
exec "$KVBLEND" retrieve "${FLAGS[@]}" "$@"
