#!/usr/bin/env bash
# Set everything up from scratch (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -n "${PYTEST_WORKERS:-2}" "$@"
