#!/usr/bin/env bash
# Issue 17's measurements on the GPU machine, one part per call (each bounded; results under $OUT/speed/).
#   random:  the random-weight shapes: llama3-8b 14 x 512 and 6 x 512, qwen2.5-1.5b 14 x 512, llama3.1-8b 64 x 512
#   real:    the real SmolLM2 (needs the weights: run through scripts/gpu/with_weights.sh): prefill on 10
#            musique_s passages (tiers gpu, cpu, disk_warm) and the decode bench
# Then here: kvblend bench prefill --from-json <the JSONs, comma list> --merged-out docs/results/bench/prefill_h200.json
#            --summary docs/results/bench/summary.json ; kvblend bench decode --from-json ... (docs/BENCHMARKS.md)
set -uo pipefail
part=$1
mkdir -p "$OUT/speed"
export PYTHONPATH="${PYTHONPATH:-$PWD}" PYTHONUNBUFFERED=1
B="python3 -m kvblend.cli bench"
common=(--device cuda --ratios 0.15 --chunk-counts "" --chunk-tokens 512)
run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$OUT/speed/$name.log" 2>&1
  echo "$name: rc=$? $(grep -E 'P[0-9]|wrote' "$OUT/speed/$name.log" | tail -3 | tr '\n' ' ')"
}
if [ "$part" = random ]; then
  run p14 200 $B prefill "${common[@]}" --shapes llama3-8b,qwen2.5-1.5b --chunks 14 --iters 5 --warmup 2 --tiers gpu \
      --out "$OUT/speed/prefill_14x512.json"
  run p6 120 $B prefill "${common[@]}" --shapes llama3-8b --chunks 6 --iters 5 --warmup 2 --tiers gpu \
      --out "$OUT/speed/prefill_6x512.json"
  run p64 240 $B prefill "${common[@]}" --shapes llama3.1-8b --chunks 64 --iters 3 --warmup 1 --tiers gpu \
      --out "$OUT/speed/prefill_64x512.json"
elif [ "$part" = real ]; then
  run preal 200 $B prefill --device cuda --ratios 0.15 --chunk-counts "" --shapes none --real smollm2 \
      --real-passages 10 --iters 8 --tiers gpu,cpu,disk_warm --out "$OUT/speed/prefill_real10.json"
  run decode 240 $B decode --device cuda --real smollm2 --out "$OUT/speed/decode.json"
elif [ "$part" = p14 ]; then
  run p14 200 $B prefill "${common[@]}" --shapes llama3-8b,qwen2.5-1.5b --chunks 14 --iters 5 --warmup 2 --tiers gpu \
      --out "$OUT/speed/prefill_14x512.json"
fi
for f in "$OUT"/speed/*.log; do echo "== $f"; grep -vE "^\s*$" "$f" | grep -E "^\|.*(full|blend|reuse|hf_forward|place)" | head -30; done
