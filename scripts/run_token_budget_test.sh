#!/usr/bin/env bash
# KV bytes per token and how many tokens / chunks fit in a GPU.
# Env overrides: MODEL (llama-3-8b), GPU_MEM (80GiB), DTYPE (bfloat16), CHUNK_TOKENS (512)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
: "${MODEL:=llama-3-8b}" "${GPU_MEM:=80GiB}"
opt MODEL --model; opt GPU_MEM --gpu-mem; opt DTYPE --dtype; opt CHUNK_TOKENS --chunk-tokens
exec "$KVBLEND" budget "${FLAGS[@]}" "$@"
