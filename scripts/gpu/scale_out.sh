#!/usr/bin/env bash
# Issue 22: the scale-out bench on one GPU host (two GPUs): a redis-server for the remote chunk tier and a local Ray
# cluster, then `kvblend bench serve --replicas N` with 1 and with 2 replicas (one GPU each). Writes
# $OUT/scale_out/serve_scale_out_<N>gpu.json (OUT defaults to docs/results/bench) and a log beside them.
# usage: bash scripts/gpu/scale_out.sh [extra bench serve args...]     (MODEL, REQUESTS, CONCURRENCY may be set)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:-docs/results/bench}
mkdir -p "$OUT/scale_out"
command -v redis-server >/dev/null || { echo "redis-server missing: apt-get install -y redis-server" >&2; exit 1; }
work=$(mktemp -d)
port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --dir "$work" --save '' --appendonly no --daemonize yes \
    --pidfile "$work/redis.pid" --logfile "$work/redis.log"
ray start --head --num-gpus 2 --include-dashboard false --disable-usage-stats >"$work/ray.log" 2>&1
cleanup() { ray stop >/dev/null 2>&1 || true; kill "$(cat "$work/redis.pid")" 2>/dev/null || true; }
trap cleanup EXIT
for n in 1 2; do
  "$PY" -m kvblend.cli bench serve --replicas "$n" --replica-gpus 1 --replica-cpus 2 --device cuda \
      --dtype bfloat16 --model "${MODEL:-smollm2-135m-instruct}" --requests "${REQUESTS:-200}" \
      --concurrency "${CONCURRENCY:-16}" --docs 4 --pool 64 --remote-store "redis://127.0.0.1:$port" \
      --ray-address auto --out "$OUT/scale_out/serve_scale_out_${n}gpu.json" "$@" \
      2>&1 | tee "$OUT/scale_out/serve_scale_out_${n}gpu.log"
done
