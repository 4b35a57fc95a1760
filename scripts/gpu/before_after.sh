#!/usr/bin/env bash
# On the GPU machine: the same benches on an earlier tree (carried in .before/, from `git archive <sha>`) and on
# this checkout, interleaved, so "before / after" ratios come from one run. Writes JSON under $OUT/ba/.
# usage: bash scripts/gpu/before_after.sh prefill|decode [extra bench args...]
# BEFORE_DIR: the earlier tree (default .before; a call that also carries the weights may not fit it: copy it
# to /tmp in the call before, e.g. cp -r .before /tmp/kvblend-before, and pass BEFORE_DIR=/tmp/kvblend-before)
set -uo pipefail
what=$1; shift
mkdir -p "$OUT/ba"
for tree in before after; do
  dir=$PWD; [ "$tree" = before ] && dir=${BEFORE_DIR:-$PWD/.before}
  ( cd "$dir" && PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" KVBLEND_GIT_SHA=$tree \
      python3 -m kvblend.cli bench "$what" "$@" --out "$OUT/ba/${what}_${tree}_${TAG:-x}.json" ) \
      > /tmp/ba.log 2>&1
  rc=$?
  { echo "=== $what $tree ${TAG:-x} rc=$rc"; tail -40 /tmp/ba.log; } >> "$OUT/ba/log.txt"
  echo "$what $tree ${TAG:-x}: rc=$rc $(tail -1 /tmp/ba.log)"
done
