#!/usr/bin/env bash
# Speculative decoding with tiered chunks and promotions -> results/decoding/<dataset>_spec_<drafter>_<proxy>_g<N>.json
# and results/decoding/speculative_trace.json. SPECULATIVE=0 runs plain decoding -> results/decoding/<dataset>_<mode>.json
# Env overrides: DATASET, TOP_K, RETRIEVAL_MODE, SCOPE, MODEL, DTYPE, DEVICE, LIMIT, MODE (full|reuse|blend), RATIO,
#                MAX_NEW_TOKENS, GPU_CHUNKS (chunks resident on GPU, default 2; TOP_K_GPU: old name), START_TIER, DRAFTER (ngram|model|none), DRAFT_MODEL,
#                PROXY (key_bounds|draft_attention|ngram_source|none), THRESHOLD, SPEC_K, TRACE_OUT, RESULTS_DIR, CONFIG
set -euo pipefail
source "$(dirname "$0")/../_common.sh"
: "${DATASET:=musique_s}" "${TOP_K:=5}" "${RETRIEVAL_MODE:=both}" "${SPECULATIVE:=1}"
opt DATASET --dataset; opt TOP_K --top-k; opt RETRIEVAL_MODE --retrieval-mode; opt SCOPE --scope
opt MODEL --model; opt DTYPE --dtype; opt DEVICE --device; opt LIMIT --limit; opt MODE --mode; opt RATIO --ratio
opt MAX_NEW_TOKENS --max-new-tokens; GPU_CHUNKS="${GPU_CHUNKS:-${TOP_K_GPU:-}}"; opt GPU_CHUNKS --gpu-chunks; opt START_TIER --start-tier; opt RESULTS_DIR --results-dir; opt CONFIG --config
if [[ "$SPECULATIVE" == "1" ]]; then
  FLAGS+=(--speculative)
  opt DRAFTER --drafter; opt DRAFT_MODEL --draft-model; opt PROXY --proxy; opt THRESHOLD --threshold
  opt SPEC_K --spec-k; opt TRACE_OUT --trace-out
fi
exec "$KVBLEND" decode "${FLAGS[@]}" "$@"
