#!/usr/bin/env bash
# Create .venv (Python 3.11) and install coreml-hub with its test extras.
# torch comes first, pinned to the CPU build, so no multi-GB CUDA build is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $("$PY" --version)..." >&2
  "$PY" -m venv .venv
fi
. .venv/bin/activate
log=.venv/coreml-hub-install.log
install() {
  python -m pip install "$@" >>"$log" 2>&1 || {
    echo "pip install $* failed; the end of $log:" >&2; tail -n 30 "$log" >&2; exit 1; }
}
: >"$log"
python -c "import torch" 2>/dev/null || { echo "Installing torch==2.13.0 (CPU build)..." >&2; install "torch==2.13.0"; }
echo "Installing coreml-hub and its dependencies..." >&2
install -e ".[test]"
python -c "import coreml_hub, torch, coremltools, diffusers, transformers" >/dev/null 2>&1 || {
  echo "setup failed: coreml-hub's dependencies do not import (see $log)" >&2; exit 1; }
# The browser tests drive Debian's Chromium through its chromedriver; nothing downloads a browser.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
    echo "Installing chromium and chromium-driver (for the browser tests)..." >&2
    { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver \
      || { $SUDO apt-get update && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }
    } >>"$log" 2>&1 \
      || echo "Could not install chromium and chromium-driver (see $log): the browser tests will be skipped." >&2
  else
    echo "apt-get is not available: install Chromium and chromedriver (/usr/bin/chromium, /usr/bin/chromedriver," \
         "or set COREML_HUB_CHROMIUM and COREML_HUB_CHROMEDRIVER) to run the browser tests; they are skipped without them." >&2
  fi
fi
