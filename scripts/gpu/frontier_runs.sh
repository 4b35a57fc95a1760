#!/usr/bin/env bash
# All quality-frontier runs of docs/QUALITY.md in one GPU command (SmolLM2, real weights):
#   call 1: carry [".gpu/parts0"]                           command: bash scripts/gpu/with_weights.sh
#   call 2: carry [".gpu/parts1", ".gpu/whl", ".gpu/data"]  command: KVBLEND_GIT_SHA=<sha> bash scripts/gpu/with_weights.sh bash scripts/gpu/frontier_runs.sh
# .gpu/data/samsum/samsum_test.json: a copy of /work/shared/data/samsum/samsum_test.json (not redistributable,
# so never committed). Passes, each bounded by a deadline (seconds after the start; a rerun resumes):
#   1. every variant at ratios 0 / 0.15 / 1 on musique_s #0-49 and samsum #0-49, fp32;
#   2. held-out check at 0.15: musique_s #100-149 and samsum #50-99 (not used to pick the default);
#   3. the rest of the ratio grid for every variant on the pass-1 samples;
#   4. only with D4=<deadline>: bf16 at 0 / 0.15 / 1 for the main variants.
# Merged results land in $OUT (shards stay in /tmp).
set -uo pipefail
export KVBLEND_DATA_DIR="$PWD/.gpu/data"
OUTQ=/tmp/kvblend-quality
mkdir -p "$OUTQ"
JOBS=${JOBS:-7}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-50}
PY=${PY:-python3}
OUT=${OUT:-$OUTQ/out}
mkdir -p "$OUT"
$PY -c "from kvblend.model.registry import load_model; load_model('smollm2-135m-instruct', 'float32', '$DEVICE')" >/dev/null
export KVBLEND_FRONTIER_STARTED=$(date +%s)
F="$PY -m kvblend.cli frontier --device $DEVICE --quiet --out-dir $OUTQ --jobs $JOBS ${EXTRA:-}"
HELD="plain,prefix,prefix_rank,prefix_product,prefix_narrow,prefix_product_narrow,prefix_attn_narrow"
MAIN="plain,prefix,prefix_product,prefix_product_narrow"
pass() {  # deadline_s args...: both datasets side by side
  local d=$1; shift
  $F --dataset musique_s --deadline-s "$d" "$@" > "$OUTQ/log_m.txt" 2>&1 &
  local a=$!
  $F --dataset samsum --deadline-s "$d" "$@" > "$OUTQ/log_s.txt" 2>&1 &
  wait $a $!
  tail -n 3 "$OUTQ/log_m.txt" "$OUTQ/log_s.txt"
  echo "== pass done at $(( $(date +%s) - KVBLEND_FRONTIER_STARTED )) s"
}
pass "${D1:-140}" --limit $LIMIT --variants all --ratios 0,0.15,1
$F --dataset musique_s --offset 100 --limit $LIMIT --variants "$HELD" --ratios 0.15 --deadline-s "${D2:-170}" > "$OUTQ/log_h1.txt" 2>&1 &
a=$!
$F --dataset samsum --offset 50 --limit $LIMIT --variants "$HELD" --ratios 0.15 --deadline-s "${D2:-170}" > "$OUTQ/log_h2.txt" 2>&1 &
wait $a $!
tail -n 2 "$OUTQ/log_h1.txt" "$OUTQ/log_h2.txt"
echo "== held-out done at $(( $(date +%s) - KVBLEND_FRONTIER_STARTED )) s"
pass "${D3:-200}" --limit $LIMIT --variants all --ratios 0.05,0.1,0.2,0.3,0.5
if [ "${D4:-0}" != 0 ]; then pass "$D4" --limit $LIMIT --variants "$MAIN" --ratios 0,0.15,1 --dtype bfloat16; fi
cp "$OUTQ"/frontier_*.json "$OUT"/ 2>/dev/null
rm -f "$OUT"/*.shard*.json
ls -la "$OUT"
