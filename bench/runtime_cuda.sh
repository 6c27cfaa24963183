#!/usr/bin/env bash
# CUDA checks of the portable ML Program runtime, in one short run (about 3-5 minutes).
#
#   bash bench/runtime_cuda.sh [CARRY_DIR]
#
# Run from the repository root on a machine with a CUDA GPU and torch (CUDA build) installed.
# CARRY_DIR (default: bench-carry) holds what `python bench/runtime_cuda_prepare.py` wrote on
# a machine with coremltools:
#   cuda-fixtures.tar.gz               tiny compiled SD1/SDXL components + source-module outputs
#   sd15-w128-original.carry.tar.gz    the benchmark Unet, weights regenerated here from a seed
#   sd15-w320-original.carry.tar.gz    the same at SD 1.5's full widths (FULL=0 skips it)
#   wheels/ (optional)                 wheels to install offline when diffusers is missing
# Nothing here needs coremltools: compiled bundles are read by the runtime's own parser.
# Logs and JSON results go to $OUT (default ./runtime-cuda-out).
set -u
cd "$(dirname "$0")/.."
CARRY="${1:-bench-carry}"
OUT="${OUT:-$PWD/runtime-cuda-out}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"  # DEVICE=cpu dry-runs the script on a machine without a GPU
status=0

log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

log "$(date -u +%FT%TZ) runtime CUDA checks"
$PY - <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import torch, numpy
print("torch", torch.__version__, "cuda", torch.version.cuda, "numpy", numpy.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
EOF

if ! $PY -c "import diffusers" 2>/dev/null; then
  if [ -d "$CARRY/wheels" ]; then
    log "installing carried wheels (offline)"
    $PY -m pip install --no-index --find-links "$CARRY/wheels" diffusers safetensors huggingface_hub pytest \
      >"$OUT/pip.log" 2>&1 || log "pip install failed (see pip.log)"
  else
    log "diffusers is not installed and no wheels were carried: the benchmark anchor cannot run"
  fi
fi
$PY -c "import pytest" 2>/dev/null || { [ -d "$CARRY/wheels" ] && $PY -m pip install --no-index --find-links "$CARRY/wheels" pytest >>"$OUT/pip.log" 2>&1; }

# 1. parity on CUDA: carried tiny fixtures (fp16 and fp32), plus every CUDA test that can run here
if [ -f "$CARRY/cuda-fixtures.tar.gz" ]; then
  tar -xzf "$CARRY/cuda-fixtures.tar.gz" -C "$WORK"
  export COREML_HUB_CUDA_FIXTURES="$WORK/cuda-fixtures"
fi
log "pytest -k cuda (tests/test_runtime_parity.py tests/test_runtime.py)"
timeout 240 $PY -m pytest tests/test_runtime_parity.py tests/test_runtime.py -k cuda -q -rs -p no:cacheprovider \
  >"$OUT/cuda_tests.log" 2>&1
rc=$?
tail -n 15 "$OUT/cuda_tests.log" | tee -a "$OUT/summary.txt"
[ $rc -eq 0 ] || { log "CUDA tests exit status $rc"; status=1; }

# 2. the benchmark: runtime (fp16 program in fp16) vs diffusers fp16 + SDPA, same weights;
#    the narrow Unet, then (FULL=0 skips it) SD 1.5's full widths
bench() {  # bench NAME WIDTHS-LABEL
  local name="$1" label="$2" archive="$CARRY/$1.carry.tar.gz"
  if [ ! -f "$archive" ]; then log "no $archive: benchmark skipped"; return; fi
  tar -xzf "$archive" -C "$WORK"
  log "bench/runtime_bench.py --device $DEVICE ($label, batch 2, 32x32 latents)"
  timeout 300 $PY bench/runtime_bench.py --device "$DEVICE" --bundle "$WORK/$name.mlmodelc" \
    --runs "${RUNS:-30}" --warmup 5 --calls 5 --json >"$OUT/bench_$name.json" 2>"$OUT/bench_$name.err"
  local rc=$?
  if [ $rc -eq 0 ]; then
    $PY - "$OUT/bench_$name.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"time/call runtime {r['runtime_s']*1e3:.2f} ms  diffusers {r['anchor_s']*1e3:.2f} ms  ratio {r['time_ratio']:.3f}"
      f"  (fastest {r['runtime_min_s']*1e3:.2f} / {r['anchor_min_s']*1e3:.2f} ms)")
if "cuda_memory_ratio" in r:
    print(f"peak CUDA memory runtime {r['runtime_peak_cuda']/2**20:.0f} MiB  diffusers {r['anchor_peak_cuda']/2**20:.0f} MiB"
          f"  ratio {r['cuda_memory_ratio']:.3f}")
print(f"peak RSS ratio {r['rss_ratio']:.3f}; load {r['runtime_load_s']:.1f} s vs {r['anchor_load_s']:.1f} s")
print(f"output rel. diff vs diffusers {r['output_rel_diff']:.2e}; {r['steps']} steps, "
      f"{r['fused_attention']} attention / {r['fused_group_norm']} group-norm fusions")
EOF
  else
    log "benchmark exit status $rc"; tail -n 20 "$OUT/bench_$name.err" | tee -a "$OUT/summary.txt"; status=1
  fi
  rm -rf "$WORK/$name.mlmodelc"
}
bench sd15-w128-original "widths 128/256/512/512"
[ "${FULL:-1}" = "0" ] || bench sd15-w320-original "SD 1.5 full widths 320/640/1280/1280"

rm -rf "$WORK"
log "done (status $status); logs in $OUT"
exit $status
