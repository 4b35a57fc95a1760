# Shared by the wrapper scripts: find the kvblend executable and build optional flags from env overrides.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${KVBLEND:-}" ]]; then :; elif [[ -x "$ROOT/.venv/bin/kvblend" ]]; then KVBLEND="$ROOT/.venv/bin/kvblend"; else KVBLEND=kvblend; fi
FLAGS=()
# opt VAR --flag: add "--flag $VAR" when the environment variable VAR is set and not empty
opt() { local v="${!1:-}"; if [[ -n "$v" ]]; then FLAGS+=("$2" "$v"); fi; }
