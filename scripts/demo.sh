#!/usr/bin/env bash
# Set everything up (if needed) and run the offline demo: serve a bundled tiny model,
# then list, show, pull and run it. Ends with the path of a generated PNG.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/coreml-hub demo "$@"
