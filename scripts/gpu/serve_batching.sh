#!/usr/bin/env bash
# Issue 19's batching figures on the GPU machine (through scripts/gpu/with_weights.sh: the real SmolLM2):
# one run at concurrency 16 (one at a time vs continuous batching) and one unloaded run (concurrency 1).
# Then here: kvblend bench serve --from-json <c16>,<c1> --summary docs/results/bench/summary.json
set -uo pipefail
mkdir -p "$OUT/serve"
common=(--device cuda --dtype bfloat16 --pool 32 --docs 4 --max-tokens 32)
timeout 300 python3 -m kvblend.cli bench serve "${common[@]}" --modes blend:batch1,blend:batch16 --concurrency 16 \
    --requests 96 --rounds 2 --out "$OUT/serve/serve_batching_c16.json" --log-dir "$OUT/serve/logs16" \
    > "$OUT/serve/c16.log" 2>&1; echo "c16 rc=$?"; tail -8 "$OUT/serve/c16.log"
timeout 150 python3 -m kvblend.cli bench serve "${common[@]}" --modes blend:batch16 --concurrency 1 \
    --requests 12 --rounds 1 --out "$OUT/serve/serve_batching_c1.json" --log-dir "$OUT/serve/logs1" \
    > "$OUT/serve/c1.log" 2>&1; echo "c1 rc=$?"; tail -5 "$OUT/serve/c1.log"
