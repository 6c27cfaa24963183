#!/usr/bin/env bash
# Set everything up from scratch (if needed) and run the test suite.
#   ./scripts/test.sh             the quick tier (under 8 minutes on two busy cores)
#   ./scripts/test.sh --all       both tiers: what CI runs
#   ./scripts/test.sh ARGS...     other arguments go to pytest (a file, -k, -x ...)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
args=()
for arg in "$@"; do
  if [ "$arg" = "--all" ]; then args+=("--all-tiers"); else args+=("$arg"); fi
done
exec python -m pytest -n "${PYTEST_WORKERS:-2}" ${args[@]+"${args[@]}"}
