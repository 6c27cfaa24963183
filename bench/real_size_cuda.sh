#!/usr/bin/env bash
# Real-size checks of the portable runtime on a CUDA GPU, in one run of about 10 minutes (H100).
#
#   bash bench/real_size_cuda.sh [CARRY_DIR]
#
# Run from the repository root on a machine with a CUDA GPU and a CUDA build of torch.
# CARRY_DIR (default: bench-carry) holds what `python bench/real_size_cuda_prepare.py` wrote
# on a machine with coremltools:
#   cuda-fixtures.tar.gz                  tiny compiled components + source-module outputs (parity)
#   sd15-512-original.carry.tar.gz        SD 1.5 at 512², weights regenerated here from the seed
#   sdxl-1024-original.carry.tar.gz       SDXL base at 1024² (optional: its conversion needs ~28 GB)
#   wheels/ (optional)                    wheels to install offline when diffusers is missing
# Steps, each under its own time limit, most important first:
#   1. CUDA parity tests (tiny models): the default runtime, then with COREML_HUB_COMPILE=1
#   2. SD 1.5 512²: Unet step vs diffusers fp16 SDPA eager and both with torch.compile; VAE,
#      text encoder, s/image; fresh processes: load, first image, peak CUDA memory, --reduce-memory
#   3. SDXL 1024² (when carried): the same, and the --reduce-memory peak against the default
# DEVICE=cpu dry-runs the whole script on a machine without a GPU (tiny step counts); with
# BENCHES=tiny-64-original (`real_size_cuda_prepare.py --tiny`) it takes a few minutes.
# Logs and JSON results go to $OUT (default ./real-size-cuda-out); summary.txt has every figure.
set -u
cd "$(dirname "$0")/.."
CARRY="${1:-bench-carry}"
OUT="${OUT:-$PWD/real-size-cuda-out}"
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-20}"
RUNS="${RUNS:-10}"
if [ "$DEVICE" = "cpu" ]; then STEPS="${STEPS_CPU:-2}"; RUNS=1; fi
status=0
t_start=$(date +%s)

log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
elapsed() { echo $(( $(date +%s) - t_start )); }

log "$(date -u +%FT%TZ) real-size checks on $DEVICE (steps $STEPS, runs $RUNS)"
$PY - <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import os, torch, numpy
print("torch", torch.__version__, "cuda", torch.version.cuda, "numpy", numpy.__version__, "cpus", os.cpu_count())
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
EOF

if ! $PY -c "import diffusers, transformers, pluggy, platformdirs, filelock, tqdm, PIL, pytest" 2>/dev/null; then
  if [ -d "$CARRY/wheels" ]; then
    log "installing carried wheels (offline)"
    $PY -m pip install --no-index --find-links "$CARRY/wheels" diffusers transformers safetensors huggingface_hub \
      pluggy platformdirs filelock tqdm pillow pytest >"$OUT/pip.log" 2>&1 || log "pip install failed (see pip.log)"
  else
    log "diffusers/transformers (or another import) are missing and no wheels were carried: the anchors cannot run"
  fi
fi

# 1. parity on CUDA: carried tiny fixtures and every CUDA test that runs here; then compiled
if [ -f "$CARRY/cuda-fixtures.tar.gz" ]; then
  tar -xzf "$CARRY/cuda-fixtures.tar.gz" -C "$WORK"
  export COREML_HUB_CUDA_FIXTURES="$WORK/cuda-fixtures"
fi
for compile in 0 1; do
  log "[$(elapsed) s] pytest -k cuda (COREML_HUB_COMPILE=$compile)"
  COREML_HUB_COMPILE=$compile timeout 150 $PY -m pytest tests/test_runtime_parity.py tests/test_runtime.py -k cuda \
    -q -rs -p no:cacheprovider -p no:randomly >"$OUT/cuda_tests_compile$compile.log" 2>&1
  rc=$?
  tail -n 6 "$OUT/cuda_tests_compile$compile.log" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || { log "CUDA tests (compile=$compile) exit status $rc"; status=1; }
done

# 2./3. the real-size benchmark on one carried conversion
bench() {  # bench NAME LIMIT_S EXTRA...
  local name="$1" limit="$2"; shift 2
  local archive="$CARRY/$name.carry.tar.gz"
  if [ ! -f "$archive" ]; then log "no $archive: $name skipped"; return; fi
  mkdir -p "$WORK/$name" && tar -xzf "$archive" -C "$WORK/$name"
  log "[$(elapsed) s] bench/real_size.py $name on $DEVICE (limit $limit s)"
  timeout "$limit" $PY bench/real_size.py --carried "$WORK/$name/variant" --work "$WORK" --device "$DEVICE" \
    --steps "$STEPS" --runs "$RUNS" --image-runs 1 --warmup 2 "$@" --json \
    >"$OUT/$name.json" 2>"$OUT/$name.err"
  local rc=$?
  if [ $rc -eq 0 ]; then
    $PY - "$OUT/$name.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
sys.path.insert(0, "bench")
from real_size import report
report(json.load(open(sys.argv[1])))
EOF
  else
    log "$name: exit status $rc"; tail -n 25 "$OUT/$name.err" | tee -a "$OUT/summary.txt"; status=1
  fi
  rm -rf "$WORK/$name" "$WORK"/*-source
}
# torch.compile on both sides (CUDA); a CPU dry run leaves it out unless DRY_COMPILE=1 (inductor's
# CPU compile of a whole Unet takes minutes on a small machine)
COMPILE="--compile"
[ "$DEVICE" = "cpu" ] && [ -z "${DRY_COMPILE:-}" ] && COMPILE=""
if [ -n "${BENCHES:-}" ]; then  # e.g. BENCHES=tiny-64-original for a dry run
  for name in $BENCHES; do bench "$name" 420 $COMPILE; done
else
  bench sd15-512-original 420 $COMPILE
  bench sdxl-1024-original 360 $COMPILE --parts unet,vae,image
fi

log "[$(elapsed) s] done (status $status); logs in $OUT"
[ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
exit $status
