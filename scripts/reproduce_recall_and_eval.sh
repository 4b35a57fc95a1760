#!/usr/bin/env bash
# Reproduces docs/RESULTS.md's pipeline numbers: answer-recall@5 per retrieval mode (musique_s, all 150
# samples, per-sample and pooled) and the 20-sample eval table (default model, CPU, bm25 top-5 as measured).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
OUT="${OUT:-$ROOT/docs/results}"
RES="${RESULTS_DIR:-$ROOT/results}"
mkdir -p "$OUT"
: > "$OUT/recall_musique_s.txt"
for scope in per_sample pooled; do
  for mode in bm25 dense both colbert; do
    "$KVBLEND" retrieve --dataset musique_s --retrieval-mode "$mode" --scope "$scope" --top-k 5 --quiet \
      --results-dir "$RES" | tee -a "$OUT/recall_musique_s.txt"
  done
done
"$KVBLEND" run --dataset musique_s --limit 20 --retrieval-mode bm25 --quiet --results-dir "$RES" | tee "$OUT/eval_musique_s_20.txt"
cp "$RES/eval/musique_s_eval.json" "$OUT/eval_musique_s_20.json"
