#!/usr/bin/env bash
# Speculative decoding with tiered chunks and promotions -> results/decoding/<dataset>_spec_<drafter>_<proxy>_g<N>.json
# and results/decoding/speculative_trace.json. SPECULATIVE=0 runs plain decoding -> results/decoding/<dataset>_<mode>.json
# Env overrides: DATASET, TOP_K, RETRIEVAL_MODE, SCOPE, MODEL, DTYPE, DEVICE, LIMIT, MODE (full|reuse|blend), RATIO,
#                MAX_NEW_TOKENS, TOP_K_GPU (chunks resident on GPU), DRAFTER (ngram|model|none), DRAFT_MODEL,
#                PROXY (key_bounds|draft_attention|ngram_source|none), THRESHOLD, SPEC_K, TRACE_OUT, RESULTS_DIR, CONFIG
set -euo pipefail
source "$(dirname "$0")/../_common.sh"
: "${DATASET:=musique_s}" "${TOP_K:=5}" "${RETRIEVAL_MODE:=bm25}" "${SPECULATIVE:=1}"
opt DATASET --dataset; opt TOP_K --top-k; opt RETRIEVAL_MODE --retrieval-mode; opt SCOPE --scope
opt MODEL --model; opt DTYPE --dtype; opt DEVICE --device; opt LIMIT --limit; opt MODE --mode; opt RATIO --ratio
opt MAX_NEW_TOKENS --max-new-tokens; opt TOP_K_GPU --top-k-gpu; opt RESULTS_DIR --results-dir; opt CONFIG --config
if [[ "$SPECULATIVE" == "1" ]]; then
  FLAGS+=(--speculative)
  opt DRAFTER --drafter; opt DRAFT_MODEL --draft-model; opt PROXY --proxy; opt THRESHOLD --threshold
  opt SPEC_K --spec-k; opt TRACE_OUT --trace-out
fi
exec "$KVBLEND" decode "${FLAGS[@]}" "$@"
