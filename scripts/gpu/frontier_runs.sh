#!/usr/bin/env bash
# All quality-frontier runs of docs/QUALITY.md in one GPU command (SmolLM2, real weights):
#   call 1: carry [".gpu/parts0"]                                             command: bash scripts/gpu/with_weights.sh
#   call 2: carry [".gpu/parts1", ".gpu/whl", ".gpu/data", "results/quality"]  command (timeout_s 600):
#           KVBLEND_GIT_SHA=$(git rev-parse HEAD) bash scripts/gpu/with_weights.sh bash scripts/gpu/frontier_runs.sh
#   then, here: copy the returned frontier_*.json into results/quality/ and run `kvblend frontier --report`.
# .gpu/data/samsum/samsum_test.json: a copy of /work/shared/data/samsum/samsum_test.json (not redistributable,
# so never committed). KVBLEND_GIT_SHA: the GPU copy has no .git; every sample records the sha it was made at.
#
# Passes, in this order, each bounded by a deadline in seconds after the script's start (env vars; a pass starts
# no new sample after its deadline, a sample under way finishes, so allow ~45 s of overrun on pass 1):
#   D1  (150) pass 1: every variant (`--variants all`, the new candidates included) at ratios 0 / 0.15 / 1 on
#             musique_s #0-49 and samsum #0-49, fp32;
#   DQ3 (240) Q3_promotion_recovery (--promotion): the EngineConfig default variant at 0.15 with 2 of 5 chunks
#             resident + promotions, all 5 resident, 2 resident without promotions, on the same 50 samples of
#             Q3_DATASETS (default "musique_s samsum"; samsum's 128-token answers cost ~3x musique_s's);
#   D2  (320) held-out check at 0.15: musique_s #100-149 and samsum #50-99 (not used to pick the default);
#   D3  (430) the rest of the ratio grid (0.05 0.1 0.2 0.3 0.5) for GRID (default: the main variants);
#   D4  (530) bf16 at 0 / 0.15 / 1 for the main variants (D4=0 skips it).
# Set a deadline lower to shorten a pass; LIMIT (50), JOBS (7 worker processes per dataset), DEVICE (cuda).
#
# Resuming: every pass skips the samples whose runs (and promotion record) its file already holds, and every
# --jobs worker resumes from the merged file as well as from its own shard file. So rerunning this same command
# goes on where the previous call stopped: on a warm machine from /tmp/kvblend-quality, on a fresh one from the
# merged files carried in PREV (default results/quality; a file already in /tmp/kvblend-quality wins). The
# merged files are copied to $OUT after every pass, so a call killed at its time limit still returns them.
set -uo pipefail
export KVBLEND_DATA_DIR="$PWD/.gpu/data"
OUTQ=${OUTQ:-/tmp/kvblend-quality}
mkdir -p "$OUTQ"
JOBS=${JOBS:-7}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-50}
PY=${PY:-python3}
OUT=${OUT:-$OUTQ/out}
PREV=${PREV:-results/quality}
Q3_DATASETS=${Q3_DATASETS:-musique_s samsum}
mkdir -p "$OUT"
if [ -d "$PREV" ]; then
  for f in "$PREV"/frontier_*.json; do
    [ -e "$f" ] || continue
    case "$f" in *.shard*) continue ;; esac
    [ -e "$OUTQ/$(basename "$f")" ] || { cp "$f" "$OUTQ/" && echo "resume from $f"; }
  done
fi
save() {  # the merged files (not the shards) to $OUT
  for f in "$OUTQ"/frontier_*.json; do
    [ -e "$f" ] || continue
    case "$f" in *.shard*) ;; *) cp "$f" "$OUT/" ;; esac
  done
}
trap save EXIT
$PY -c "from kvblend.model.registry import load_model; load_model('smollm2-135m-instruct', 'float32', '$DEVICE')" >/dev/null
export KVBLEND_FRONTIER_STARTED=$(date +%s)
F="$PY -m kvblend.cli frontier --device $DEVICE --quiet --out-dir $OUTQ --jobs $JOBS ${EXTRA:-}"
DEFAULT=$($PY -c "from kvblend.quality.report import default_variant; print(default_variant())")
NEW="prefix_epic_product_narrow,prefix_product_narrow5,prefix_tail_product_narrow"
HELD="plain,prefix,prefix_rank,prefix_product,prefix_narrow,prefix_product_narrow,prefix_attn_narrow,$NEW"
MAIN="plain,prefix,prefix_product,$DEFAULT"
GRID=${GRID:-$MAIN}
elapsed() { echo "$(( $(date +%s) - KVBLEND_FRONTIER_STARTED )) s"; }
pass() {  # name deadline_s args...: musique_s and samsum side by side (args may hold per-dataset flags)
  local name=$1 d=$2; shift 2
  $F --dataset musique_s --deadline-s "$d" "$@" > "$OUTQ/log_${name}_m.txt" 2>&1 &
  local a=$!
  $F --dataset samsum --deadline-s "$d" "$@" > "$OUTQ/log_${name}_s.txt" 2>&1 &
  wait $a $!
  tail -n 2 "$OUTQ/log_${name}_m.txt" "$OUTQ/log_${name}_s.txt"
  save
  echo "== $name done at $(elapsed)"
}
pass p1 "${D1:-150}" --limit "$LIMIT" --variants all --ratios 0,0.15,1
for ds in $Q3_DATASETS; do
  $F --dataset "$ds" --limit "$LIMIT" --variants "$DEFAULT" --ratios 0.15 --promotion --deadline-s "${DQ3:-240}" \
    > "$OUTQ/log_q3_$ds.txt" 2>&1 &
done
wait
tail -n 2 "$OUTQ"/log_q3_*.txt
save
echo "== q3 done at $(elapsed)"
$F --dataset musique_s --offset 100 --limit "$LIMIT" --variants "$HELD" --ratios 0.15 --deadline-s "${D2:-320}" \
  > "$OUTQ/log_h_m.txt" 2>&1 &
a=$!
$F --dataset samsum --offset 50 --limit "$LIMIT" --variants "$HELD" --ratios 0.15 --deadline-s "${D2:-320}" \
  > "$OUTQ/log_h_s.txt" 2>&1 &
wait $a $!
tail -n 2 "$OUTQ/log_h_m.txt" "$OUTQ/log_h_s.txt"
save
echo "== held-out done at $(elapsed)"
pass grid "${D3:-430}" --limit "$LIMIT" --variants "$GRID" --ratios 0.05,0.1,0.2,0.3,0.5
if [ "${D4:-530}" != 0 ]; then pass bf16 "${D4:-530}" --limit "$LIMIT" --variants "$MAIN" --ratios 0,0.15,1 --dtype bfloat16; fi
save
grep -h "deadline reached\|Error\|error" "$OUTQ"/log_*.txt | sort | uniq -c | head -20
ls -la "$OUT"
