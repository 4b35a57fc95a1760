#!/usr/bin/env bash
# Figures and a report from results/ -> results/analysis/*.png and results/analysis/report.md (kvblend analyze):
# promotion timelines per sample, TTFT/TPOT and quality/fidelity per mode, the budget sweep, answer-recall@k.
# Env overrides: RESULTS_DIR (results), OUT (<RESULTS_DIR>/analysis), MAX_TIMELINES (12 per trace file)
set -euo pipefail
source "$(dirname "$0")/../_common.sh"
: "${RESULTS_DIR:=results}"
opt RESULTS_DIR --results; opt OUT --out; opt MAX_TIMELINES --max-timelines
exec "$KVBLEND" analyze "${FLAGS[@]}" "$@"
